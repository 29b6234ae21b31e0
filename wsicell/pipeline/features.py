"""A trained model's discriminator features of the stored crops, for exports (``wsicell
export --features MODEL``: AnnData / SpatialData ``obsm["X_wsicell_d"]``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsicell.io.store import complete_slides, open_store, slide_crops
from wsicell.learning.saved_model import load_trained_model

#: Crops read and passed through D at a time (bounded memory).
FEATURE_BLOCK = 4096


def discriminator_features(store: str | Path, model_dir: str | Path, slide_ids=None,
                           device: str = "cpu") -> dict[str, np.ndarray]:
    """The paper's D features (:meth:`TrainedModel.features`) of every crop of the slides.

    Returns
    -------
    dict of str to ndarray, shape (n_cells, F), float32
        Per slide (default: every complete slide), rows in cell_id order.
    """
    model = load_trained_model(model_dir, device)
    root = open_store(store)
    features = {}
    for slide_id in list(slide_ids) if slide_ids else complete_slides(root):
        crops = slide_crops(root, slide_id)
        blocks = [model.features(crops[start:start + FEATURE_BLOCK])
                  for start in range(0, len(crops), FEATURE_BLOCK)]
        features[slide_id] = (np.concatenate(blocks) if blocks
                              else model.features(np.zeros((0, 32, 32, 3), np.uint8)))
    return features
