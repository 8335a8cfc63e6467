"""The speech codebook: k-means in torch (the error metric of the units is in speech_metrics.py).

k-means: k-means++ init, Lloyd (full batch) or mini-batch updates.

k-means is deterministic under a seed (one torch.Generator drives every random choice; CPU
sums are in float64). Empty clusters are re-seeded from the points that lie
farthest from their centroid, so every code stays in use. Used by the speech
unit tokenizer (`mot.tokenize.speech`); it works on any (N, D) float data.

    centroids, history = kmeans(frames, k=128, iters=50, seed=0)
    labels, sq_dist = assign(frames, centroids)
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row of x (N, D): (labels (N,) int64, squared distances (N,))."""
    labels, sq = [], []
    c_sq = centroids.pow(2).sum(1)
    for part in x.split(chunk):
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, one matmul per chunk keeps memory at chunk * k
        d = part.pow(2).sum(1, keepdim=True) - 2 * part @ centroids.T + c_sq
        best, idx = d.min(1)
        labels.append(idx)
        sq.append(best.clamp_min(0))
    return torch.cat(labels), torch.cat(sq)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Arthur & Vassilvitskii (2007): each next centre drawn with probability proportional to D(x)^2."""
    n = x.shape[0]
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype)
    first = int(torch.randint(n, (1,), generator=generator))
    centroids[0] = x[first]
    d2 = (x - x[first]).pow(2).sum(1)
    for i in range(1, k):
        total = d2.sum()
        if total > 0:
            j = int(torch.multinomial(d2 / total, 1, generator=generator))
        else:  # fewer distinct points than k: any point will do
            j = int(torch.randint(n, (1,), generator=generator))
        centroids[i] = x[j]
        d2 = torch.minimum(d2, (x - x[j]).pow(2).sum(1))
    return centroids


def _reseed_empty(centroids: torch.Tensor, counts: torch.Tensor, x: torch.Tensor, sq: torch.Tensor) -> int:
    """Move every centroid with no points onto a distinct far point (largest distance to its centroid)."""
    empty = (counts == 0).nonzero().flatten()
    if len(empty):
        far = sq.topk(min(len(empty), len(sq))).indices
        centroids[empty[: len(far)]] = x[far]
    return len(empty)


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 50,
    seed: int = 0,
    batch_size: int = 0,
    tol: float = 1e-5,
    show_progress: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """Cluster the rows of x (N, D) into k centroids (k, D).

    batch_size = 0: Lloyd's algorithm over all points, `iters` iterations, stopping early when
    the mean squared distance ("inertia") improves by less than `tol` (relative).
    batch_size > 0: mini-batch k-means (Sculley 2010), `iters` steps of `batch_size` random points,
    each centroid moving towards its points with a per-centroid rate 1 / (points seen so far).
    Returns the centroids and the inertia after each iteration (mini-batch: on the batch).
    """
    if x.ndim != 2 or x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} rows of a 2-D tensor, got shape {tuple(x.shape)}")
    x = x.float()
    generator = torch.Generator().manual_seed(seed)
    centroids = kmeans_plus_plus(x, k, generator)
    history: list[float] = []
    bar = tqdm(range(iters), desc=f"k-means k={k}", disable=not show_progress, leave=False)
    seen = torch.zeros(k, dtype=torch.float64)
    for _ in bar:
        batch = x[torch.randint(x.shape[0], (batch_size,), generator=generator)] if batch_size else x
        labels, sq = assign(batch, centroids)
        history.append(float(sq.mean()))
        counts = torch.bincount(labels, minlength=k).double()
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, labels, batch.double())
        hit = counts > 0
        if batch_size:
            seen += counts
            # running mean over every point each centroid has been given: c <- c + (sum - n c) / seen
            step = (sums[hit] - counts[hit, None] * centroids[hit].double()) / seen[hit, None]
            centroids[hit] = (centroids[hit].double() + step).float()
            n_empty = _reseed_empty(centroids, seen, batch, sq)
        else:
            centroids[hit] = (sums[hit] / counts[hit, None]).float()
            n_empty = _reseed_empty(centroids, counts, batch, sq)
        bar.set_postfix(inertia=f"{history[-1]:.4g}", empty=n_empty)
        converged = len(history) > 1 and history[-2] - history[-1] <= tol * max(history[-2], 1e-12)
        if not batch_size and n_empty == 0 and converged:
            break
    return centroids, history
