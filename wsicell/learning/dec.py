"""Deep embedded clustering (DEC; J. Xie, R. Girshick, A. Farhadi, ICML 2016), small.

The strongest baseline of the paper's Table III ("HOG + DEC"): a stacked autoencoder is
pretrained to reconstruct the (standardised) features, k-means on its embedding gives the
initial cluster centres, then the encoder and the centres are refined together by
self-training: the soft assignments ``q`` (Student's t kernel, one degree of freedom) are
pulled towards the sharpened target ``p = q^2 / f`` (``f``: soft cluster frequencies),
recomputed every ``update_interval`` steps, by minimising KL(P || Q); training stops when
fewer than ``tol`` of the cells change cluster between two targets.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.preprocessing import StandardScaler
from torch import nn


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def soft_assignments(embedding: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """DEC's q: Student's t similarity of each embedded point to each centre, normalised.

    Parameters
    ----------
    embedding : Tensor, shape (N, D), float
    centres : Tensor, shape (K, D), float

    Returns
    -------
    Tensor, shape (N, K): each row sums to 1.

    Examples
    --------
    >>> q = soft_assignments(torch.tensor([[0.0], [10.0]]), torch.tensor([[0.0], [10.0]]))
    >>> bool((q.argmax(1) == torch.tensor([0, 1])).all()), float(q.sum(1)[0])
    (True, 1.0)
    """
    kernel = 1.0 / (1.0 + torch.cdist(embedding, centres) ** 2)
    return kernel / kernel.sum(dim=1, keepdim=True)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """DEC's auxiliary target p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j'), f_j = sum_i q_ij.

    Examples
    --------
    >>> p = target_distribution(torch.tensor([[0.6, 0.4], [0.4, 0.6]]))
    >>> round(float(p[0, 0]), 3)  # sharper than q
    0.692
    """
    weight = q ** 2 / q.sum(dim=0)
    return weight / weight.sum(dim=1, keepdim=True)


def dec_clusters(features: np.ndarray, fit: np.ndarray, k: int, seed: int = 0, *,
                 hidden: tuple[int, ...] = (256, 64), embed_dim: int = 10,
                 pretrain_epochs: int = 30, batch_size: int = 256, max_steps: int = 2000,
                 update_interval: int = 100, tol: float = 0.001, lr: float = 1e-3
                 ) -> np.ndarray:
    """Cluster with DEC, fitted on the rows where ``fit`` is True, applied to every row.

    Parameters
    ----------
    features : ndarray, shape (N, F), float
        One feature vector per cell (the paper: HOG of the cell image); standardised with
        the statistics of the fitted rows.
    fit : ndarray, shape (N,), bool
        Rows the autoencoder, the centres and the self-training see (at least ``k``).
    k : int
        Number of clusters.
    seed : int
        Seeds torch's and k-means's random numbers (CPU results are repeatable).
    hidden, embed_dim : ints
        Encoder layer sizes; the decoder mirrors them (the paper's DEC: 500-500-2000-10,
        smaller here for cells of a few hundred features).
    pretrain_epochs : int
        Autoencoder epochs (mean squared reconstruction error, Adam ``lr``).
    batch_size, max_steps, update_interval, tol : int, int, int, float
        Self-training batches, its longest run in steps, steps between target updates and
        the share of changed assignments under which it stops.

    Returns
    -------
    ndarray, shape (N,), int64, values in ``0..k-1``: each row's most likely cluster.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.vstack([rng.normal(m, 0.3, (60, 4)) for m in (-3.0, 0.0, 3.0)])
    >>> labels = dec_clusters(x, np.ones(180, bool), 3, pretrain_epochs=20, max_steps=200)
    >>> sorted(np.bincount(labels).tolist())
    [60, 60, 60]
    """
    features = np.asarray(features, dtype=np.float64)
    fit = np.asarray(fit, dtype=bool)
    if fit.sum() < k:
        raise ValueError(f"DEC needs at least k={k} rows to fit, got {int(fit.sum())}")
    scaled = StandardScaler().fit(features[fit]).transform(features).astype(np.float32)
    x_all = torch.from_numpy(scaled)
    x_fit = x_all[torch.from_numpy(fit)]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sizes = [scaled.shape[1], *hidden, embed_dim]
    encoder, decoder = _mlp(sizes), _mlp(sizes[::-1])

    optimiser = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=lr)
    n = len(x_fit)
    for _ in range(pretrain_epochs):
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            loss = nn.functional.mse_loss(decoder(encoder(x_fit[batch])), x_fit[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()

    with torch.no_grad():
        embedded = encoder(x_fit).numpy()
    kmeans = KMeans(k, init="k-means++", n_init=20, random_state=seed).fit(embedded)
    centres = nn.Parameter(torch.from_numpy(kmeans.cluster_centers_.astype(np.float32)))
    optimiser = torch.optim.Adam([*encoder.parameters(), centres], lr=lr / 10)
    previous = torch.from_numpy(kmeans.labels_.astype(np.int64))
    target = None
    for step in range(max_steps):
        if step % update_interval == 0:
            with torch.no_grad():
                q = soft_assignments(encoder(x_fit), centres)
            assigned = q.argmax(dim=1)
            changed = (assigned != previous).float().mean().item()
            previous = assigned
            if step > 0 and changed < tol:
                break
            target = target_distribution(q)
        batch = torch.randint(n, (min(batch_size, n),), generator=generator)
        q_batch = soft_assignments(encoder(x_fit[batch]), centres)
        loss = nn.functional.kl_div(q_batch.log(), target[batch], reduction="batchmean")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    with torch.no_grad():
        return soft_assignments(encoder(x_all), centres).argmax(dim=1).numpy().astype(np.int64)
