"""A trained model on disk (``model.pt`` + ``config.json``) and the model ready for inference.

:func:`save_trained_model` writes the final weights of a training run;
:func:`load_trained_model` reads them back as a :class:`TrainedModel` whose
:meth:`~TrainedModel.classify` gives Q's cluster probabilities of uint8 crops and
:meth:`~TrainedModel.features` the paper's discriminator features.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import torch

import wsicell
from wsicell.config import WsicellConfig
from wsicell.errors import WsicellError
from wsicell.files import write_atomically
from wsicell.learning.augment import to_unit_range
from wsicell.learning.data import check_crops
from wsicell.learning.device import resolve_device
from wsicell.learning.model import CROP_SIZE, InfoWGAN, generator_grid, model_for

MODEL_FILE, CONFIG_FILE, MODEL_FORMAT = "model.pt", "config.json", "wsicell-model-v1"
# what config.json says about the training run (models of older versions lack some)
TRAINING_KEYS = ("iterations", "epochs_iterations", "stop_reason", "wall_s", "device",
                 "precision", "n_crops")


def weights_id(state_dict: dict) -> str:
    """A stable hash of the weights: sha256 over the sorted names and tensor bytes (16 hex)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def save_trained_model(out_dir: Path, model: InfoWGAN, config: WsicellConfig,
                       provenance: dict) -> str:
    """Write ``model.pt`` (weights) and then ``config.json`` (which marks the directory as
    complete), both atomically; returns the model id."""
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    model_id = weights_id(state)
    write_atomically(out_dir / MODEL_FILE,
                     lambda f: torch.save({"format": MODEL_FORMAT, "state_dict": state}, f))
    meta = {"wsicell_version": wsicell.__version__, "model_id": model_id,
            "k": model.categories, "crop_size": CROP_SIZE, "config": config.to_json(),
            **provenance}
    write_atomically(out_dir / CONFIG_FILE,
                     lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    return model_id


class TrainedModel:
    """A trained model ready for inference (see :func:`load_trained_model`).

    Attributes
    ----------
    model_id : str
        Stable hash of the weights.
    config : WsicellConfig
        The configuration it was trained with.
    k : int
        Number of categories (clusters).
    crop_size : int
        Side of the crops it takes (32).
    training : dict
        The training run as ``config.json`` records it (those of ``TRAINING_KEYS`` it
        holds): iterations trained, ``epochs_iterations`` (what the configured epochs
        take), ``stop_reason`` (``epochs``, ``max_iters``, ``max_minutes``), ``wall_s``,
        ``device``, ``precision``, ``n_crops``.
    """

    def __init__(self, network: InfoWGAN, config: WsicellConfig, model_id: str,
                 device: torch.device, training: dict | None = None):
        self.network = network.eval()
        self.config = config
        self.model_id = model_id
        self.k = network.categories
        self.crop_size = CROP_SIZE
        self.device = device
        self.training = dict(training or {})

    def _batched(self, crops: np.ndarray, batch_size: int, function) -> np.ndarray:
        crops = check_crops(crops)
        cfg = self.config.train
        outputs = []
        with torch.no_grad():
            for start in range(0, len(crops), batch_size):
                batch = torch.from_numpy(crops[start:start + batch_size]).to(self.device)
                x = to_unit_range(batch, cfg.nucleus_px, cfg.size_channel)
                outputs.append(function(x).float().cpu().numpy())
        if not outputs:
            empty = torch.zeros(1, self.network.channels, CROP_SIZE, CROP_SIZE, device=self.device)
            width = function(empty).shape[1]
            return np.zeros((0, width), dtype=np.float32)
        return np.concatenate(outputs).astype(np.float32)

    def classify(self, crops: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Q's softmax probabilities: uint8 crops (N, 32, 32, 3) -> float32 (N, k)."""
        return self._batched(crops, batch_size,
                             lambda x: torch.softmax(self.network.q_logits(x).float(), dim=1))

    def features(self, crops: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """The paper's D features: uint8 crops (N, 32, 32, 3) -> float32 (N, 64 * width)."""
        return self._batched(crops, batch_size, self.network.discriminator_features)

    def generate_grid(self, n_rows: int, seed: int = 0) -> np.ndarray:
        """G's samples, uint8 (n_rows, k, 32, 32, 3): rows = fixed z, columns = categories."""
        return generator_grid(self.network, n_rows, seed)


def _load_weights(path: Path) -> dict:
    """``torch.load`` of tensors only; a file holding other Python objects (a pickle that
    could run code) is refused in one line that names what it holds.  PyTorch's own message
    suggests loading such a file with ``weights_only=False``, which would run that code:
    it is never shown."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise WsicellError(
            f"{path}: refused: it holds Python objects{what}, not only tensors; a model "
            "file can run code when such objects are loaded, so wsicell loads weights only "
            "(use a model.pt written by wsicell train)") from None
    if not isinstance(saved, dict):
        raise ValueError(f"a {type(saved).__name__}, not a wsicell model")
    return saved


def load_trained_model(model_dir, device="cpu") -> TrainedModel:
    """Load the final model of a training run (``model.pt`` + ``config.json``).

    Raises :class:`WsicellError` when the directory holds no complete, readable model.
    """
    model_dir = Path(model_dir)
    meta_path, weights_path = model_dir / CONFIG_FILE, model_dir / MODEL_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise WsicellError(f"{model_dir}: not a trained wsicell model (no {CONFIG_FILE} "
                           f"and {MODEL_FILE}; did training finish?)")
    try:
        meta = json.loads(meta_path.read_text())
        config = WsicellConfig.from_record(meta["config"])
        saved = _load_weights(weights_path)
        if saved.get("format") != MODEL_FORMAT:
            raise ValueError("unknown format")
        network = model_for(config.train)
        network.load_state_dict(saved["state_dict"])
    except WsicellError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable model is a user error here
        raise WsicellError(f"{model_dir}: unreadable model ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if isinstance(device, str):
        device = resolve_device(device)
    return TrainedModel(network.to(device), config, weights_id(saved["state_dict"]), device,
                        {key: meta[key] for key in TRAINING_KEYS if key in meta})
