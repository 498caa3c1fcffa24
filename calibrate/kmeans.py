"""Balanced spherical k-means, seeded and deterministic (for the VQ logits codebook).

    assign, centroids = balanced_spherical_kmeans(rows, k, seed=0)

rows [V, H] (any float dtype, any device) -> assign [V] int64 in [0, k), centroids
[k, H] float32 of unit norm (the cluster directions). Rows are compared by cosine
(spherical k-means: the LM head scores tokens by dot products, and a row's direction
decides which hidden states favour it more than its norm).

Why balanced: the exact head gathers every member of each probed cluster, so the
largest cluster sets the kernel's tile and the bytes read per probe. A cap of
ceil(balance * V / k) members per cluster (balance 1.0 = perfectly even) keeps the
member table dense ([k, cap], padded with -1) and the per-probe cost fixed.

The balanced assignment is greedy: points are placed most-confident first into their
best cluster that still has room, among their `candidates` nearest centroids; the few
left over (all candidates full) go to the best centroid with room. It is not the
optimal transport assignment, but it is deterministic, O(V * candidates) after the
similarity matmul, and never exceeds the cap.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import numpy as np
import torch


class KMeansError(ValueError):
    """Bad arguments to the clustering (one line)."""


def _check(rows: torch.Tensor, k: int, balance: float, iters: int) -> None:
    if rows.dim() != 2 or rows.shape[0] < 1 or rows.shape[1] < 1:
        raise KMeansError(f"rows: got shape {tuple(rows.shape)}; expected [V, H] with V, H >= 1")
    if not isinstance(k, int) or not 1 <= k <= rows.shape[0]:
        raise KMeansError(f"k: got {k!r}; allowed: an integer in [1, {rows.shape[0]}] (the number of rows)")
    if not 1.0 <= balance <= 4.0:
        raise KMeansError(f"balance: got {balance!r}; allowed: a number in [1.0, 4.0] (1.0 = equal cluster sizes)")
    if iters < 1:
        raise KMeansError(f"iters: got {iters!r}; allowed: an integer >= 1")


def cluster_capacity(v: int, k: int, balance: float) -> int:
    """Members allowed per cluster: ceil(balance * V / k) (at least ceil(V / k), so all rows fit)."""
    return max(math.ceil(v / k), math.ceil(balance * v / k))


def _top_candidates(x: torch.Tensor, c: torch.Tensor, t: int, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """The t most similar centroids of every row: (scores [V, t] f32, ids [V, t] i64), chunked
    so the [chunk, k] similarity block stays small."""
    scores, ids = [], []
    for s in range(0, x.shape[0], chunk):
        sim = x[s:s + chunk] @ c.T
        top = sim.topk(t, dim=1)
        scores.append(top.values.float().cpu())
        ids.append(top.indices.cpu())
    return torch.cat(scores).numpy(), torch.cat(ids).numpy()


def _greedy_balanced(x: torch.Tensor, c: torch.Tensor, cap: int, candidates: int) -> np.ndarray:
    """Capacity-constrained assignment (see module docstring)."""
    v, k = x.shape[0], c.shape[0]
    t = min(candidates, k)
    cand_s, cand_i = _top_candidates(x, c, t)
    order = np.argsort(-cand_s[:, 0], kind="stable")
    sizes = np.zeros(k, dtype=np.int64)
    assign = np.full(v, -1, dtype=np.int64)
    for p in order:
        for j in cand_i[p]:
            if sizes[j] < cap:
                assign[p] = j
                sizes[j] += 1
                break
    left = np.nonzero(assign < 0)[0]
    if left.size:
        sim = (x[torch.from_numpy(left).to(x.device)] @ c.T).float().cpu().numpy()
        for row in np.argsort(-sim.max(axis=1), kind="stable"):
            j = int(np.argmax(np.where(sizes < cap, sim[row], -np.inf)))
            assign[left[row]] = j
            sizes[j] += 1
    return assign


def _update(x: torch.Tensor, assign: np.ndarray, k: int, prev: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """New unit centroids = normalised member sums; an empty cluster is reseeded at a random row."""
    idx = torch.from_numpy(assign).to(x.device)
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, idx, x.float())
    counts = torch.bincount(idx, minlength=k)
    empty = (counts == 0).nonzero().flatten().cpu()
    if empty.numel():
        picks = torch.randint(0, x.shape[0], (empty.numel(),), generator=gen)
        sums[empty.to(x.device)] = x[picks.to(x.device)].float()
    return torch.nn.functional.normalize(sums, dim=1)


def _progress(total: int, enabled: bool, desc: str) -> Callable[[str], None]:
    """A tqdm bar on stderr when tqdm is installed, else one line per step (or nothing)."""
    if not enabled:
        return lambda info: None
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

        def step(info: str) -> None:
            bar.set_postfix_str(info)
            bar.update(1)
            if bar.n >= total:
                bar.close()

        return step
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        count = [0]

        def step(info: str) -> None:
            count[0] += 1
            print(f"{desc}: {count[0]}/{total} {info}", file=sys.stderr)

        return step


def balanced_spherical_kmeans(
    rows: torch.Tensor,
    k: int,
    *,
    iters: int = 15,
    seed: int = 0,
    balance: float = 1.0,
    candidates: int = 16,
    tol: float = 1e-3,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster rows [V, H] into k balanced groups by cosine similarity.

    Returns (assign [V] int64 on CPU, centroids [k, H] float32 unit rows on rows' device).
    Deterministic for a given seed, device and input. Stops early when fewer than
    tol * V rows change cluster in an iteration.
    """
    _check(rows, k, balance, iters)
    v = rows.shape[0]
    x = torch.nn.functional.normalize(rows.detach().float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(v, generator=gen)[:k].to(x.device)].clone()
    cap = cluster_capacity(v, k, balance)
    step = _progress(iters, progress, f"k-means k={k}")
    assign = None
    for it in range(iters):
        new = _greedy_balanced(x, centroids, cap, candidates)
        changed = v if assign is None else int((new != assign).sum())
        assign = new
        centroids = _update(x, assign, k, centroids, gen)
        step(f"changed={changed}")
        if changed <= tol * v:
            break
    return torch.from_numpy(assign), centroids
