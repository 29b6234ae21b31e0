"""A trained nucleus network against the weight-free default (issue 25's next design change).

Trains a small U-Net to tell background, nucleus interior and nucleus boundary apart, on the
default's own per-image hematoxylin and eosin optical density brought to 0.5 um/px, from the
train parts of MoNuSeg and CoNSeP, holding out 4 MoNuSeg images (every third, the first four)
and 3 CoNSeP train tiles (``train_5``, ``train_13``, ``train_21``; a tile's patches share
nuclei). Its instances: the interior's 4-connected components are the markers of a watershed
of the negated interior probability inside the foreground (interior + boundary), both maps
brought back to the file's pixels. It is then scored with ``segmentation_accuracy.py``'s own
set functions beside the default: the held-out MoNuSeg images and CoNSeP tiles, CoNSeP test
(reported only), bm_graz and BRCA-M2C dev (never trained on: marrow at 0.4 um/px, breast at
0.5 um/px), the negative control, and CMU-1 (objects in its keratin and dermis boxes).

Needs ../shared/data. The network and its training live here, not in the package: it is a
measured experiment (docs/segmentation.md, ninth round), not a preset.

    python benchmarks/nucleus_net.py --minutes 45 --save net.pt   # 2-core CPU, then scores
    python benchmarks/nucleus_net.py --weights net.pt             # scores saved weights
    python benchmarks/nucleus_net.py --minutes 10 --width 32 --device cuda

``net_tested`` is the network's nuclei put through the default's own area floor (2.5 x the
calibrated radius^2) and peak test (top-hat hematoxylin OD 0.2), the calibration taken at the
file's resolution.

Closing ``name: value`` lines: ``net_<figure>``, ``net_tested_<figure>`` and
``default_<figure>`` for the held-out MoNuSeg AJI, CoNSeP test AJI / detection F1, bm_graz
F1 / precision, BRCA dev F1 / precision / recall, negative-control objects per mm2;
``training_steps`` (0 with ``--weights``); ``net_s_per_mp`` (stain fit, resampling, network
and upsampling per file megapixel, on ``--device``).
"""

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from _common import SHARED_DATA, headline

NET_MPP = 0.5
OD_SCALE = 4.0
CROP = 128
HELD_OUT_CONSEP_TILES = ("train_5", "train_13", "train_21")
CLASS_WEIGHTS = (1.0, 1.0, 2.0)


def boundary_classes(instances: np.ndarray) -> np.ndarray:
    """Training target of an instance map.

    Parameters
    ----------
    instances : ndarray, shape (H, W), int
        0 = background, one id per nucleus.

    Returns
    -------
    ndarray, shape (H, W), uint8
        0 background, 1 interior, 2 boundary (a nucleus pixel with a 4-neighbour of another
        id or of the background; the image border does not count).

    Examples
    --------
    >>> boundary_classes(np.array([[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 2]]))
    array([[0, 2, 1, 1],
           [0, 2, 1, 2],
           [0, 2, 2, 2]], dtype=uint8)
    """
    from skimage.segmentation import find_boundaries

    instances = np.asarray(instances)
    out = (instances > 0).astype(np.uint8)
    out[find_boundaries(instances, connectivity=1, mode="inner")] = 2
    return out


def instances_from_probabilities(probabilities: np.ndarray, mpp: float,
                                 interior: float = 0.5, foreground: float = 0.5,
                                 min_area_um2: float = 4.0, min_marker_um2: float = 1.0
                                 ) -> np.ndarray:
    """Nuclei from the network's class probabilities.

    Parameters
    ----------
    probabilities : ndarray, shape (3, H, W), float32
        Background, interior and boundary probabilities (summing to 1 per pixel).
    mpp : float
        Microns per pixel of the maps.
    interior, foreground : float
        Markers: 4-connected components of interior probability over ``interior`` (at least
        ``min_marker_um2``); nuclei: pixels whose interior + boundary probability exceeds
        ``foreground``, given to the markers by a watershed of the negated interior
        probability.
    min_area_um2 : float
        Smaller nuclei are dropped.

    Returns
    -------
    ndarray, shape (H, W), int32
        Labels 1..N, 0 = background.

    Examples
    --------
    >>> p = np.zeros((3, 8, 8), np.float32); p[0] = 1
    >>> p[:, 2:6, 1:7] = np.array([0, 0.1, 0.9])[:, None, None]  # one nucleus's boundary
    >>> p[:, 3:5, 2:6] = np.array([0, 0.9, 0.1])[:, None, None]  # and its interior
    >>> int(instances_from_probabilities(p, 1.0, min_area_um2=4).max())
    1
    """
    from skimage.measure import label
    from skimage.segmentation import relabel_sequential, watershed

    mask = probabilities[1] + probabilities[2] > foreground
    markers = label((probabilities[1] > interior) & mask, connectivity=1)
    area = np.bincount(markers.ravel())
    small = area * mpp ** 2 < min_marker_um2
    small[0] = False
    markers[small[markers]] = 0
    labels = watershed(-probabilities[1], markers, mask=mask)
    area = np.bincount(labels.ravel())
    drop = area * mpp ** 2 < min_area_um2
    drop[0] = True
    labels[drop[labels]] = 0
    return relabel_sequential(labels)[0].astype(np.int32)


def stain_od(rgb: np.ndarray, config) -> np.ndarray:
    """Hematoxylin and eosin optical density (2, H, W) float32 of an RGB image, from the
    default's own per-image stain fit (gain and hematoxylin-angle limits included)."""
    from wsicell.segmentation.adaptive import hematoxylin_od
    from wsicell.segmentation.stain import fit_stain_parameters

    stain = fit_stain_parameters(rgb, config.stain, **config.segmentation.adaptive.stain_fit)
    hematoxylin, eosin = stain.stains_of(rgb)
    return np.stack([hematoxylin_od(hematoxylin), hematoxylin_od(eosin)])


def to_net_grid(channels: np.ndarray, mpp: float) -> np.ndarray:
    """(C, H, W) at ``mpp`` -> (C, h, w) at 0.5 um/px (area average down, linear up)."""
    scale = mpp / NET_MPP
    if abs(scale - 1) < 1e-3:
        return channels
    how = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return np.stack([cv2.resize(c, None, fx=scale, fy=scale, interpolation=how)
                     for c in channels])


def unet(width: int):
    """A three-level U-Net, (B, 2, H, W) -> (B, 3, H, W) logits; H, W multiples of 8."""
    import torch
    from torch import nn

    def block(n_in, n_out):
        return nn.Sequential(
            nn.Conv2d(n_in, n_out, 3, padding=1), nn.BatchNorm2d(n_out), nn.ReLU(inplace=True),
            nn.Conv2d(n_out, n_out, 3, padding=1), nn.BatchNorm2d(n_out), nn.ReLU(inplace=True))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            ch = [width, 2 * width, 4 * width]
            self.down = nn.ModuleList([block(2, ch[0]), block(ch[0], ch[1]),
                                       block(ch[1], ch[2])])
            self.middle = block(ch[2], 2 * ch[2])
            self.up = nn.ModuleList([nn.ConvTranspose2d(n_in, n_out, 2, 2) for n_in, n_out
                                     in zip([ch[1], ch[2], 2 * ch[2]], ch)])
            self.merge = nn.ModuleList([block(2 * c, c) for c in ch])
            self.head = nn.Conv2d(ch[0], 3, 1)

        def forward(self, x):
            skips = []
            for down in self.down:
                x = down(x)
                skips.append(x)
                x = nn.functional.max_pool2d(x, 2)
            x = self.middle(x)
            for level in reversed(range(3)):
                x = self.merge[level](torch.cat([self.up[level](x), skips[level]], 1))
            return self.head(x)

    return UNet()


def training_images(config) -> tuple[list, list]:
    """(train, validation) lists of (od at 0.5 um/px x OD_SCALE, classes, name)."""
    from segmentation_accuracy import CONSEP_MPP, MONUSEG_MPP, read_labels

    from wsicell.io.slide import read_rgb_image

    monuseg = SHARED_DATA / "monuseg_train"
    consep = SHARED_DATA / "consep_patches"
    held_monuseg = monuseg_images()[::3][:4]
    images = [(path, monuseg / "instances" / f"{path.stem}.png", MONUSEG_MPP,
               path in held_monuseg) for path in monuseg_images()]
    images += [(path, consep / "instances" / "train" / f"{path.stem}.png", CONSEP_MPP,
                path.stem.rsplit("_", 1)[0] in HELD_OUT_CONSEP_TILES)
               for path in sorted((consep / "images" / "train").glob("*.jpg"))]
    train, validation = [], []
    for path, masks, mpp, held in images:
        od = to_net_grid(stain_od(read_rgb_image(path), config), mpp) * OD_SCALE
        instances = cv2.resize(read_labels(masks).astype(np.float32), od.shape[:0:-1],
                               interpolation=cv2.INTER_NEAREST).astype(np.int32)
        (validation if held else train).append(
            (od.astype(np.float32), boundary_classes(instances), path.name))
    return train, validation


def monuseg_images() -> list[Path]:
    """The MoNuSeg train images, sorted (the held-out ones are every third, the first 4)."""
    return sorted((SHARED_DATA / "monuseg_train" / "images").glob("*.png"))


def train_network(train: list, validation: list, width: int, minutes: float, device: str,
                  seed: int = 0, batch: int = 16, max_steps: int | None = None,
                  check_every: int = 200, log=print):
    """Train until ``minutes`` have passed (or ``max_steps``): Adam (1e-3, cosine to 2e-5
    over the budget), weighted cross-entropy, random 128-px crops with rotations, flips and
    a stain jitter, bfloat16 autocast. Returns the network with the weights of the lowest
    validation loss (checked every ``check_every`` steps), in eval mode, and the steps."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = unet(width).to(device)
    optimiser = torch.optim.Adam(net.parameters(), 1e-3)
    weights = torch.tensor(CLASS_WEIGHTS, device=device)
    share = np.array([y.size for _, y, _ in train], float)
    share /= share.sum()

    def crop():
        x, y, _ = train[rng.choice(len(train), p=share)]
        i, j = (rng.integers(0, n - CROP + 1) for n in y.shape)
        x, y = x[:, i:i + CROP, j:j + CROP], y[i:i + CROP, j:j + CROP]
        turns = int(rng.integers(4))
        x, y = np.rot90(x, turns, (1, 2)), np.rot90(y, turns)
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        x = x * np.exp(rng.normal(0, 0.15, (2, 1, 1))) + rng.normal(0, 0.03, (2, 1, 1))
        return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.int64)

    def validation_loss():
        net.eval()
        total = pixels = 0.0
        with torch.inference_mode(), torch.autocast(device, torch.bfloat16):
            for x, y, _ in validation:
                h, w = (n // 8 * 8 for n in y.shape)
                out = net(torch.from_numpy(x[None, :, :h, :w]).to(device)).float()
                target = torch.from_numpy(y[None, :h, :w].astype(np.int64)).to(device)
                total += F.cross_entropy(out, target, weight=weights, reduction="sum").item()
                pixels += h * w
        net.train()
        return total / pixels

    best, best_state, step, start = np.inf, None, 0, time.monotonic()
    budget = minutes * 60
    while (elapsed := time.monotonic() - start) < budget and step != max_steps:
        done = max(elapsed / budget, step / (max_steps or np.inf))
        for group in optimiser.param_groups:
            group["lr"] = 2e-5 + 1e-3 * 0.5 * (1 + np.cos(np.pi * done))
        xs, ys = zip(*(crop() for _ in range(batch)))
        with torch.autocast(device, torch.bfloat16):
            out = net(torch.from_numpy(np.stack(xs)).to(device))
        loss = F.cross_entropy(out.float(), torch.from_numpy(np.stack(ys)).to(device),
                               weight=weights)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        step += 1
        if step % check_every == 0:
            value = validation_loss()
            if value < best:
                best = value
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            log(f"step {step}, {elapsed:.0f} s: train loss {loss.item():.4f}, validation "
                f"{value:.4f} (best {best:.4f})")
    if best_state is not None:
        net.load_state_dict(best_state)
    return net.eval(), step


class NetworkPass:
    """The network's class probabilities and the default's hematoxylin contrast and
    calibration of the last file asked for (the accuracy sets run every method on one image
    before the next), with the network's time per file megapixel."""

    def __init__(self, net, device: str, config):
        self.net, self.device, self.config = net, device, config
        self.key = None
        self.seconds = self.megapixels = 0.0

    def __call__(self, path, mpp: float):
        """(probabilities (3, H, W), contrast (H, W), calibration) at the file's pixels."""
        import torch

        from wsicell.io.slide import read_rgb_image
        from wsicell.segmentation.adaptive import calibrate, contrast

        if self.key != (str(path), mpp):
            rgb = read_rgb_image(path)
            start = time.perf_counter()
            od = stain_od(rgb, self.config)
            x = to_net_grid(od, mpp) * OD_SCALE
            h, w = x.shape[1:]
            x = np.pad(x, ((0, 0), (0, -h % 8), (0, -w % 8)), mode="reflect")
            with torch.inference_mode(), torch.autocast(self.device, torch.bfloat16):
                logits = self.net(torch.from_numpy(x[None].astype(np.float32)).to(self.device))
            p = torch.softmax(logits.float(), 1)[0, :, :h, :w].cpu().numpy()
            p = np.stack([cv2.resize(c, rgb.shape[1::-1], interpolation=cv2.INTER_LINEAR)
                          for c in p])
            self.seconds += time.perf_counter() - start
            self.megapixels += rgb.shape[0] * rgb.shape[1] / 1e6
            adaptive = self.config.segmentation.adaptive
            self.key = (str(path), mpp)
            self.value = p, contrast(od[0], mpp, adaptive), calibrate(od[0], mpp, adaptive)
        return self.value


def network_method(network: NetworkPass, area_rel: float = 0.0, min_peak: float = 0.0,
                   **settings):
    """``segmentation_accuracy``'s method interface: (file labels, centroids) of a file.
    ``area_rel`` > 0: nuclei under that many calibrated radius^2 are dropped too, and
    ``min_peak`` > 0 those whose highest hematoxylin contrast (the default's top-hat OD) is
    under it: the default's own area floor and peak test, on the network's nuclei."""
    from wsicell.analysis.metrics import label_centroids

    def run(path, mpp):
        p, con, calibration = network(path, mpp)
        floor = max(settings.get("min_area_um2", 4.0), area_rel * calibration.radius_um ** 2)
        labels = instances_from_probabilities(p, mpp, **{**settings, "min_area_um2": floor})
        if min_peak > 0 and labels.max():
            from scipy import ndimage
            from skimage.segmentation import relabel_sequential

            ids = np.arange(1, int(labels.max()) + 1)
            faint = ids[ndimage.maximum(con, labels, ids) < min_peak]
            labels = relabel_sequential(np.where(np.isin(labels, faint), 0, labels))[0]
        return labels, label_centroids(labels)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=45.0, help="training time budget")
    parser.add_argument("--width", type=int, default=16, help="channels of the first level")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interior", type=float, default=0.5)
    parser.add_argument("--foreground", type=float, default=0.6)
    parser.add_argument("--area-rel", type=float, default=2.5,
                        help="net_tested: the default's area floor, x calibrated radius^2")
    parser.add_argument("--min-peak", type=float, default=0.2,
                        help="net_tested: the default's peak test, top-hat hematoxylin OD")
    parser.add_argument("--save", type=Path, help="write the trained weights here")
    parser.add_argument("--weights", type=Path, help="evaluate these weights, no training")
    args = parser.parse_args()

    import torch

    import segmentation_accuracy as sa
    from wsicell.config import WsicellConfig

    torch.set_num_threads(args.threads)
    config = WsicellConfig()
    if args.weights:
        net, steps = unet(args.width).to(args.device), 0
        net.load_state_dict(torch.load(args.weights, map_location=args.device))
        net.eval()
    else:
        train, validation = training_images(config)
        print(f"{len(train)} training images, {len(validation)} held out", flush=True)
        net, steps = train_network(train, validation, args.width, args.minutes, args.device,
                                   args.seed, log=lambda line: print(line, flush=True))
    if args.save:
        torch.save(net.state_dict(), args.save)
    network = NetworkPass(net, args.device, config)
    thresholds = {"interior": args.interior, "foreground": args.foreground}
    methods = {"net": network_method(network, **thresholds),
               "net_tested": network_method(network, args.area_rel, args.min_peak,
                                            **thresholds),
               "default": sa.preset_method("adaptive")}
    monuseg = monuseg_images()[::3][:4]
    consep = SHARED_DATA / "consep_patches"
    held_tiles = sorted(p for p in (consep / "images" / "train").glob("*.jpg")
                        if p.stem.rsplit("_", 1)[0] in HELD_OUT_CONSEP_TILES)
    results = {
        "monuseg": sa.show("MoNuSeg train, the 4 held-out images", sa.instance_set(
            monuseg, SHARED_DATA / "monuseg_train" / "instances", sa.MONUSEG_MPP, methods)),
        "consep_val": sa.show("CoNSeP train, the 3 held-out tiles", sa.instance_set(
            held_tiles, consep / "instances" / "train", sa.CONSEP_MPP, methods)),
        "consep": sa.show("CoNSeP test (reported only)", sa.instance_set(
            sorted((consep / "images" / "test").glob("*.jpg")), consep / "instances" / "test",
            sa.CONSEP_MPP, methods)),
        "bm_graz": sa.show("bm_graz (not trained on)", sa.bm_graz(None, methods)),
        "brca": sa.show("BRCA-M2C dev (not trained on)", sa.brca(sa.brca_parts()["dev"],
                                                                  methods)),
    }
    negative = sa.negative_control(methods)
    print("negative control, objects per mm2:",
          {name: {kind: round(v) for kind, v in kinds.items()}
           for name, kinds in negative.items()})
    cmu = SHARED_DATA / "slides" / "CMU-1-Small-Region.svs"
    for name, method in methods.items():
        labels, centres = method(cmu, 0.499)
        x, y = centres.T
        band = (y > 1150) & (y < 1850)
        print(f"CMU-1, {name}: {len(centres)} objects, keratin box (x 1250-1600) "
              f"{int((band & (x > 1250) & (x < 1600)).sum())}, dermis box (x 900-1100) "
              f"{int((band & (x > 900) & (x < 1100)).sum())}", flush=True)
    figures = {"training_steps": steps, "net_s_per_mp": network.seconds / network.megapixels}
    for name in methods:
        figures.update({
            f"{name}_monuseg_heldout_aji": results["monuseg"][name]["aji"],
            f"{name}_consep_aji": results["consep"][name]["aji"],
            f"{name}_consep_det_f1": results["consep"][name]["det_f1"],
            f"{name}_bm_graz_det_f1": results["bm_graz"][name]["det_f1"],
            f"{name}_bm_graz_precision": results["bm_graz"][name]["det_p"],
            f"{name}_brca_det_f1": results["brca"][name]["det_f1"],
            f"{name}_brca_precision": results["brca"][name]["det_p"],
            f"{name}_brca_recall": results["brca"][name]["det_r"],
            f"{name}_negative_objects_per_mm2": negative[name]["all"]})
    headline(**figures)


if __name__ == "__main__":
    main()
