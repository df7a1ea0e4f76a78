"""Readable PyTorch reference for Pixelfly attention (CPU, tests, decode steps, quality study).

``masked_softmax_attention``: the sparse pattern and the global tokens are one set of allowed (q, k) pairs (see
``butterfly_attention.pattern_allows``); a single softmax over it, as the FlexAttention path and the Triton kernels
compute it.
"""
from __future__ import annotations

import torch


def masked_softmax_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale restricted to ``keep``) v, in float32; rows with no allowed key give 0.

    q (B, H, Q, D), k/v (B, H, K, D), keep broadcastable to (B, H, Q, K). Returns (B, H, Q, D) in the
    input dtype."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)  # -inf rows
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights / denom.clamp_min(torch.finfo(torch.float32).tiny), value.float())
    return out.to(query.dtype)
