"""benchmarks/nucleus_net.py: the training target, the instances drawn from the network's
maps, a short real training run, and the evaluation's plumbing on a vendored image (the
benchmark itself trains on ../shared/data)."""

import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

import nucleus_net

torch = pytest.importorskip("torch")
SAMPLE = Path(__file__).parent / "data" / "bm_graz" / "images" / "BM_GRAZ_HE_0001_01.png"


def two_touching_nuclei() -> np.ndarray:
    """A 24 x 32 instance map: two 10 x 10 nuclei side by side, touching."""
    instances = np.zeros((24, 32), np.int32)
    instances[7:17, 6:16] = 1
    instances[7:17, 16:26] = 2
    return instances


def test_boundary_classes_mark_the_contact_between_nuclei():
    classes = nucleus_net.boundary_classes(two_touching_nuclei())
    assert set(np.unique(classes)) == {0, 1, 2}
    assert (classes[:, :6] == 0).all()
    assert (classes[7:17, 15:17] == 2).all()  # both sides of the contact
    assert (classes[8:16, 7:15] == 1).all() and (classes[8:16, 17:25] == 1).all()


def test_instances_split_at_the_boundary_and_drop_small_ones():
    classes = nucleus_net.boundary_classes(two_touching_nuclei())
    probabilities = np.stack([classes == k for k in range(3)]).astype(np.float32)
    probabilities[:, 1, 1] = (0.0, 1.0, 0.0)  # a one-pixel speck of "interior"
    labels = nucleus_net.instances_from_probabilities(probabilities, 0.5, min_area_um2=4.0)
    assert labels.max() == 2
    assert labels[1, 1] == 0
    assert len(np.unique(labels[7:17, 6:16])) == 1 and len(np.unique(labels[7:17, 16:26])) == 1
    assert labels[12, 10] != labels[12, 20]


def test_a_short_training_run_learns_and_keeps_its_best_weights():
    rng = np.random.default_rng(0)
    instances = np.zeros((160, 160), np.int32)
    for k, (y, x) in enumerate(rng.integers(8, 148, (40, 2)), start=1):
        instances[y - 4:y + 4, x - 4:x + 4] = k
    od = np.stack([(instances > 0) * 0.6 + 0.05, np.full(instances.shape, 0.2)])
    od = (od * nucleus_net.OD_SCALE).astype(np.float32)
    image = (od, nucleus_net.boundary_classes(instances), "synthetic")
    losses = []
    net, steps = nucleus_net.train_network([image], [image], width=4, minutes=10,
                                           device="cpu", batch=4, max_steps=150,
                                           check_every=50, log=losses.append)
    assert steps == 150 and len(losses) == 3 and not net.training
    with torch.inference_mode():
        predicted = net(torch.from_numpy(od[None])).argmax(1)[0].numpy()
    assert (predicted == (image[1] > 0)).mean() > 0.8  # nucleus against background learned


def test_the_evaluation_runs_on_a_real_image_at_its_pixels():
    from wsicell.config import WsicellConfig
    from wsicell.io.slide import read_rgb_image

    torch.manual_seed(0)
    network = nucleus_net.NetworkPass(nucleus_net.unet(4).eval(), "cpu", WsicellConfig())
    labels, centres = nucleus_net.network_method(network, foreground=0.3)(SAMPLE, 0.4)
    tested, _ = nucleus_net.network_method(network, 2.5, 0.2, foreground=0.3)(SAMPLE, 0.4)
    assert labels.shape == tested.shape == read_rgb_image(SAMPLE).shape[:2]
    assert len(centres) == labels.max()
    assert tested.max() <= labels.max()  # the default's tests only remove nuclei
    assert network.megapixels == pytest.approx(labels.size / 1e6)  # one pass, reused
