"""The VQ logits codebook from an LM head (`slimfx calibrate vq-head`).

The head's rows are clustered by balanced spherical k-means (kmeans.py); the clusters'
statistics (codebook, member table, sizes, radii, scales) make the artifact, whose
format, writer and reader are runtime/vq_head.py's (the head ops read it).
"""

from __future__ import annotations

import torch

from slimfx.calibrate.kmeans import balanced_spherical_kmeans
from slimfx.runtime.vq_head import FORMAT, VERSION, VQHeadArtifact


def cluster_statistics(weight: torch.Tensor, assign: torch.Tensor, k: int) -> dict:
    """Codebook, member table, sizes, radii and scales of a clustering of weight [V, H] (assign [V])."""
    w = weight.detach().float().cpu()
    assign = assign.long().cpu()
    v = w.shape[0]
    sizes = torch.bincount(assign, minlength=k)
    codebook = torch.zeros(k, w.shape[1]).index_add_(0, assign, w) / sizes.clamp_min(1)[:, None].float()
    order = torch.argsort(assign, stable=True)  # tokens grouped by code, ascending ids inside
    m = int(sizes.max())
    slot = torch.arange(v) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    members = torch.full((k, m), -1, dtype=torch.int32)
    members[assign[order], slot] = order.to(torch.int32)
    mu = codebook[assign]
    radii = torch.zeros(k).scatter_reduce_(0, assign, (w - mu).norm(dim=1), reduce="amax")
    scale = (w * mu).sum(1) / (mu * mu).sum(1).clamp_min(1e-30)
    return dict(codebook=codebook, token_to_code=assign.to(torch.int32), members=members,
                sizes=sizes.to(torch.int32), radii=radii, scale=scale)


def build_artifact(weight: torch.Tensor, k: int, *, seed: int = 0, iters: int = 15, balance: float = 1.0,
                   progress: bool = False, source: str = "") -> VQHeadArtifact:
    """Cluster the head rows weight [V, H] into k codes (balanced spherical k-means) and
    collect the per-cluster statistics."""
    assign, _ = balanced_spherical_kmeans(weight, k, iters=iters, seed=seed, balance=balance, progress=progress)
    stats = cluster_statistics(weight, assign, k)
    meta = {"format": FORMAT, "version": VERSION, "vocab": str(weight.shape[0]), "hidden": str(weight.shape[1]),
            "k": str(k), "seed": str(seed), "balance": str(balance), "iters": str(iters), "source": source}
    return VQHeadArtifact(**stats, metadata=meta)
