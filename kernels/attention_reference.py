"""Readable PyTorch reference for Pixelfly attention (CPU, tests, decode steps, quality study).

Two variants of the low-rank/global term:

* ``masked_softmax_attention``: the sparse pattern and the global tokens are one set of allowed
  (q, k) pairs (see ``butterfly_attention.pattern_allows``); a single softmax over it. This is the
  variant the FlexAttention path implements.
* ``sparse_performer_attention``: Scatterbrain-style. Exact exp(q.k) on the sparse support, the
  Performer positive-random-feature estimate phi(q).phi(k) on every other allowed key; numerator and
  denominator summed over the two disjoint supports, so each key is counted exactly once. Kept for
  the quality comparison (benchmarks/attention_quality.py); O(S^2) memory.
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


def random_feature_projection(n_features: int, head_dim: int, seed: int, device=None) -> torch.Tensor:
    """(n_features, head_dim) block-orthogonal Gaussian projection (FAVOR+), fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(-(-n_features // head_dim)):
        g = torch.randn(head_dim, head_dim, generator=gen)
        q, _ = torch.linalg.qr(g)
        norms = torch.randn(head_dim, head_dim, generator=gen).norm(dim=1)  # chi-distributed row norms
        blocks.append(q.T * norms[:, None])
    return torch.cat(blocks)[:n_features].to(device)


def _log_features(x: torch.Tensor, proj: torch.Tensor, scale: float) -> torch.Tensor:
    """log phi(x) with phi(q).phi(k) ~= exp(scale * q.k) in expectation: phi(x) = exp(w.x' - |x'|^2/2)/sqrt(m),
    x' = x * sqrt(scale)."""
    xs = x.float() * scale**0.5
    m = proj.shape[0]
    return xs @ proj.T.float() - 0.5 * (xs * xs).sum(-1, keepdim=True) - 0.5 * torch.log(torch.tensor(float(m)))


def sparse_performer_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor,
    sparse: torch.Tensor,
    proj: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Joint-normalised sparse + Performer attention.

    keep: allowed pairs (causality, padding); sparse: pairs computed exactly (both broadcastable to
    (B, H, Q, K)). Exact weights on keep & sparse, random-feature weights on keep & ~sparse; one
    shared denominator. With ``sparse`` all False this is plain (masked) Performer attention."""
    exact_set = keep & sparse
    approx_set = keep & ~sparse
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    lq = _log_features(query, proj, scale)  # (B, H, Q, m)
    lk = _log_features(key, proj, scale)  # (B, H, K, m)
    # Stabilise: per query row, and one constant for all keys (a per-key shift would bias weights).
    cq = lq.amax(dim=-1, keepdim=True)
    ck = lk.amax(dim=(-1, -2), keepdim=True)
    approx = torch.matmul(torch.exp(lq - cq), torch.exp(lk - ck).transpose(-1, -2))  # * exp(cq + ck)
    log_approx_scale = cq + ck  # (B, H, Q, 1)
    exact_scores = scores.masked_fill(~exact_set, float("-inf"))
    row_ref = torch.maximum(exact_scores.amax(dim=-1, keepdim=True), log_approx_scale)
    weights = torch.where(exact_set, torch.exp(exact_scores - row_ref), 0.0) + torch.where(
        approx_set, approx * torch.exp(log_approx_scale - row_ref), 0.0
    )
    denom = weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.matmul(weights / denom, value.float()).to(query.dtype)
