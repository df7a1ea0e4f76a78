"""Question: does a Performer global term (random features on every key outside the butterfly blocks) give better
attention quality than the library's global tokens? This module is that variant, which the attention quality study
(benchmarks/attention_quality.py) compares: the butterfly blocks and their neighbours exact, Performer random
features on every other key, one joint normalisation (Scatterbrain-style). PyTorch reference only, O(S^2) memory:
a comparison point, not a library path (the GPU kernels run global tokens).
"""
from __future__ import annotations

import torch

from pixelfly_kernels.attention_reference import random_feature_projection, sparse_performer_attention
from pixelfly_kernels.butterfly_attention import PatternSpec, sparse_part_allows


def performer_pixelfly_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: PatternSpec,
                                 n_features: int, causal: bool = True, seed: int = 0) -> torch.Tensor:
    """(B, H, S, D) -> (B, H, S, D): `spec`'s sparse part exact (its n_global is ignored), n_features random
    features (drawn from `seed`) for the rest."""
    if n_features < 1:
        raise ValueError(f"n_features={n_features} random features: use at least 1")
    seq_len, head_dim = query.shape[2], query.shape[-1]
    spec = spec._replace(n_global=0)
    positions = torch.arange(seq_len, device=query.device)
    allowed = positions[None, :] <= positions[:, None] if causal else torch.ones(seq_len, seq_len, dtype=torch.bool,
                                                                                 device=query.device)
    sparse = sparse_part_allows(positions[:, None], positions[None, :], spec, causal)
    proj = random_feature_projection(n_features, head_dim, seed, query.device)
    return sparse_performer_attention(query, key, value, allowed, sparse, proj, head_dim**-0.5)
