"""Question: does a Performer global term (random features on every key outside the butterfly blocks) give better
attention quality than the library's global tokens? This module is that variant, which the attention quality study
(benchmarks/attention_quality.py) compares: the butterfly blocks and their neighbours exact, Performer random
features on every other key, one joint normalisation (Scatterbrain-style). PyTorch reference only, O(S^2) memory:
a comparison point, not a library path (the GPU kernels run global tokens).

    python research/performer_attention.py    # checks the joint normalisation against a pair-by-pair float64 sum

Scatterbrain-style: exact exp(q.k) on the sparse support, the Performer positive-random-feature estimate
phi(q).phi(k) on every other allowed key; numerator and denominator summed over the two disjoint supports, so each
key is counted exactly once.
"""
from __future__ import annotations

import torch

from pixelfly_kernels.butterfly_attention import PatternSpec, sparse_part_allows


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


def check() -> None:
    """The joint normalisation counts each key once: against a pair-by-pair float64 sum on random inputs, and an
    exact softmax when the sparse support covers every allowed key."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 32, 16, generator=gen) * 0.5 for _ in range(3))
    scale = 0.25
    keep = torch.ones(32, 32, dtype=torch.bool).tril()
    blocks = torch.arange(32) // 8
    sparse = keep & ((blocks[:, None] ^ blocks[None, :]) <= 1)
    proj = random_feature_projection(24, 16, seed=3)
    out = sparse_performer_attention(q, k, v, keep, sparse, proj, scale)
    xs = q.double()[0, 0] * scale**0.5, k.double()[0, 0] * scale**0.5
    fq, fk = (torch.exp(x @ proj.double().T - 0.5 * (x * x).sum(-1, keepdim=True)) / 24**0.5 for x in xs)
    expected = torch.zeros(32, 16, dtype=torch.float64)
    for i in range(32):
        num, den = torch.zeros(16, dtype=torch.float64), 0.0
        for j in range(i + 1):
            w = torch.exp(q[0, 0, i].double() @ k[0, 0, j].double() * scale) if sparse[i, j] else fq[i] @ fk[j]
            num, den = num + w * v[0, 0, j].double(), den + w
        expected[i] = num / den
    torch.testing.assert_close(out[0, 0].double(), expected, atol=1e-5, rtol=1e-5)
    scores = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    exact = sparse_performer_attention(q, k, v, keep, keep, proj, scale)
    torch.testing.assert_close(exact.double(), torch.softmax(scores, -1) @ v.double(), atol=1e-5, rtol=1e-5)
    print("performer_attention: joint normalisation matches the float64 pair-by-pair sum")


if __name__ == "__main__":
    check()
