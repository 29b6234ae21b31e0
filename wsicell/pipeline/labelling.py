"""Label every cell of a store with a trained model's Q head, back into the store.

Labelling runs one task per crop chunk: on CPU the tasks go to a Dask cluster (each worker
loads the model once and writes its own chunks, so no two tasks write the same chunk); on a
GPU they run in this process, one batch after another.  The labels of a slide are marked
complete only after every chunk is written (:mod:`wsicell.io.store` owns their layout), so
an interrupted run never leaves labels that look complete; labels already complete for the
same model (and the same slide content) are left untouched, so rerunning is a no-op, and
another model writes beside them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

import wsicell
from wsicell.config import WsicellConfig
from wsicell.errors import WsicellError
from wsicell.io.store import (
    begin_labels,
    finish_labels,
    labels_complete,
    labels_k,
    open_store,
    slide_crops,
    store_lock,
    write_label_rows,
)
from wsicell.learning.saved_model import TrainedModel, load_trained_model
from wsicell.pipeline.cluster import run_tasks


def check_model_fits(root, slide_ids: list[str], model: TrainedModel) -> None:
    """Refuse a model whose crop size or k does not match the store, before writing anything.

    Raises
    ------
    WsicellError
        A slide's crops are not ``(N, crop_size, crop_size, 3)``, or the slide already holds
        labels under this model id with another k.
    """
    for slide_id in slide_ids:
        shape = slide_crops(root, slide_id).shape
        if tuple(shape[1:]) != (model.crop_size, model.crop_size, 3):
            raise WsicellError(f"{root.store}: slide {slide_id} has crops of shape {shape[1:]}; "
                               f"model {model.model_id} takes {model.crop_size}x"
                               f"{model.crop_size} RGB crops")
        k = labels_k(root, slide_id, model.model_id)
        if k is not None and k != model.k:
            raise WsicellError(f"{root.store}: slide {slide_id} holds labels of model "
                               f"{model.model_id} with k={k}, but the model has k={model.k}")


@dataclass(frozen=True)
class ChunkTask:
    """Label crops ``[start, stop)`` of one slide (one crop chunk)."""

    store: str
    slide_id: str
    start: int
    stop: int


def _chunk_tasks(root, store: str, slide_id: str) -> list[ChunkTask]:
    crops = slide_crops(root, slide_id)
    n, chunk = crops.shape[0], crops.chunks[0]
    return [ChunkTask(store, slide_id, start, min(start + chunk, n)) for start in range(0, n, chunk)]


def label_chunk(task: ChunkTask, model: TrainedModel, batch_size: int) -> int:
    """Classify one chunk of crops and write its cluster / proba chunk; returns its size."""
    root = open_store(task.store, mode="r+")
    crops = slide_crops(root, task.slide_id)[task.start:task.stop]
    proba = model.classify(crops, batch_size=batch_size)
    if proba.shape != (len(crops), model.k):
        raise WsicellError(f"model {model.model_id}: Q returned shape {proba.shape} for "
                           f"{len(crops)} crops, expected k={model.k} columns")
    write_label_rows(root, task.slide_id, model.model_id, task.start, proba)
    return task.stop - task.start


@functools.lru_cache(maxsize=2)
def _worker_model(model_dir: str, model_id: str, threads: int) -> TrainedModel:
    """The model, loaded once per Dask worker process (CPU)."""
    import torch

    torch.set_num_threads(threads)
    model = load_trained_model(model_dir, device="cpu")
    if model.model_id != model_id:
        raise WsicellError(f"{model_dir}: the model changed during prediction "
                           f"({model_id} -> {model.model_id})")
    return model


def _label_chunk_on_worker(task: ChunkTask, model_dir: str, model_id: str, crops_per_batch: int,
                           threads: int) -> int:
    return label_chunk(task, _worker_model(model_dir, model_id, threads), crops_per_batch)


def label_slides(store: str | Path, slide_ids: list[str], model_dir: str | Path,
                 model: TrainedModel, config: WsicellConfig, *, client=None,
                 threads_per_worker: int = 1, progress: bool = True) -> list[str]:
    """Write a model's labels for every listed slide that lacks complete ones.

    Parameters
    ----------
    store : path
        The cell store (complete slides only in ``slide_ids``).
    slide_ids : list of str
    model_dir : path
        Directory of ``model`` (Dask workers load it from there).
    model : TrainedModel
        The loaded model (its device is used when ``client`` is None).
    config : WsicellConfig
        Recorded with the labels; ``config.predict.batch_size`` crops per forward pass.
    client : distributed.Client, optional
        Run the chunk tasks on this Dask cluster (CPU); None runs them here, in order.
    threads_per_worker : int
        Torch threads of each Dask worker.

    Returns
    -------
    list of str
        The slides labelled by this call (empty when all were complete: a no-op).
    """
    store = str(store)
    root = open_store(store, mode="r+")
    check_model_fits(root, slide_ids, model)
    todo = [s for s in slide_ids if not labels_complete(root, s, model.model_id)]
    if not todo:
        return []
    provenance = {"config": config.to_json(), "model_config": model.config.to_json(),
                  "wsicell_version": wsicell.__version__}
    with store_lock(store, writer="prediction"):
        tasks = []
        for slide_id in todo:
            begin_labels(root, slide_id, model.model_id, model.k, provenance)
            tasks += _chunk_tasks(root, store, slide_id)
        batch_size = config.predict.batch_size
        total = sum(t.stop - t.start for t in tasks)
        with tqdm(total=total, unit="cell", desc=f"label {len(todo)} slide(s)",
                  disable=not progress, dynamic_ncols=True) as bar:
            if client is None:
                for task in tasks:
                    bar.update(label_chunk(task, model, batch_size))
            else:
                label = functools.partial(_label_chunk_on_worker, model_dir=str(model_dir),
                                          model_id=model.model_id, crops_per_batch=batch_size,
                                          threads=threads_per_worker)
                run_tasks(client, [(f"label-{t.slide_id}-{t.start}", t.stop - t.start, label,
                                    (t,)) for t in tasks], bar)
        for slide_id in todo:  # mark complete last
            finish_labels(root, slide_id, model.model_id)
    return todo
