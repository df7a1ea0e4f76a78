"""Pixelfly attention pattern and its FlexAttention (GPU) implementation.

The pattern, defined per (query position, key position) and independent of the sequence length, so
a KV-cache decode step sees exactly the keys the same query sees in a full forward:

* sequence blocks of ``block_size`` tokens; qb, kb = block indices of the query / key;
* flat block butterfly (butterfly_pattern.py): x = qb XOR kb (taken modulo ``butterfly_size`` blocks when that
  period is set), allowed iff x in {0, 1, 2, 4, ..., 2**(n_factors-1)};
* local blocks: |qb - kb| <= 1 (so every token sees its immediate predecessor, even across a block
  edge that the XOR pattern does not link);
* global tokens (the low-rank term): the first ``n_global`` positions are keys for every query and,
  when bidirectional, queries that attend to every key;
* causal models additionally need kv <= q.

The sparse part and the global part are one union of allowed (q, k) pairs, so a single softmax over
that union normalises both jointly and a key in both sets is counted once.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .butterfly_pattern import kept


class PatternSpec(NamedTuple):
    """Static pattern parameters (hashable: the BlockMask cache key)."""

    block_size: int
    butterfly_size: int | None  # period of the XOR pattern in blocks; None = no period
    n_factors: int
    n_global: int  # global tokens = the first n_global positions


def pattern_allows(q_idx: torch.Tensor, kv_idx: torch.Tensor, spec: PatternSpec, causal: bool) -> torch.Tensor:
    """Boolean "query q_idx may attend key kv_idx" for broadcastable integer index tensors.

    Pure tensor arithmetic on the indices, so it serves both as a FlexAttention ``mask_mod`` body and
    for building dense masks (reference path, KV-cache decode steps).
    """
    qb = q_idx // spec.block_size
    kb = kv_idx // spec.block_size
    x = torch.bitwise_xor(qb, kb)
    if spec.butterfly_size is not None:
        x = torch.bitwise_and(x, spec.butterfly_size - 1)
    butterfly = kept(x, spec.n_factors)
    local = (qb - kb).abs() <= 1
    allowed = butterfly | local | (kv_idx < spec.n_global)
    if causal:
        allowed = allowed & (kv_idx <= q_idx)
    else:
        allowed = allowed | (q_idx < spec.n_global)
    return allowed


def sparse_part_allows(q_idx: torch.Tensor, kv_idx: torch.Tensor, spec: PatternSpec, causal: bool) -> torch.Tensor:
    """The block-sparse part alone (no global tokens)."""
    return pattern_allows(q_idx, kv_idx, spec._replace(n_global=0), causal)


def dense_pattern(q_len: int, kv_len: int, spec: PatternSpec, causal: bool, device=None, q_offset: int = 0) -> torch.Tensor:
    """(q_len, kv_len) bool mask; query row i sits at absolute position q_offset + i."""
    q_idx = torch.arange(q_len, device=device)[:, None] + q_offset
    kv_idx = torch.arange(kv_len, device=device)[None, :]
    return pattern_allows(q_idx, kv_idx, spec, causal)


def block_density(seq_len: int, spec: PatternSpec, causal: bool) -> float:
    """Fraction of the (block_size x block_size) tiles a kernel must visit, relative to what dense
    attention visits (all tiles; the lower triangle incl. diagonal when causal)."""
    return _block_density(seq_len, *spec, causal)


# Asked on every attention call (the dense/sparse choice): cached, and a constant to torch.compile (plain
# arguments: it cannot pass a NamedTuple through), so tracing neither records its ops nor breaks at .item().
@lru_cache(maxsize=256)
@torch.compiler.assume_constant_result
def _block_density(seq_len: int, block_size: int, butterfly_size: int | None, n_factors: int, n_global: int,
                   causal: bool) -> float:
    spec = PatternSpec(block_size, butterfly_size, n_factors, n_global)
    nb = -(-seq_len // spec.block_size)
    # Tiles are touched iff any element in them is allowed; evaluating at tile granularity is exact
    # except for the global tokens and causal diagonal, which both touch the tile whenever their
    # first row/column is in it, so checking the tile's first query row / first key column suffices.
    blocks = torch.arange(nb)
    qb, kb = blocks[:, None], blocks[None, :]
    tiles = pattern_allows(qb * spec.block_size + spec.block_size - 1, kb * spec.block_size, spec, causal)
    if not causal:
        tiles |= (qb * spec.block_size < spec.n_global) | (kb * spec.block_size < spec.n_global)
    dense_tiles = nb * (nb + 1) // 2 if causal else nb * nb
    return tiles.sum().item() / dense_tiles


def _mask_mod_for(spec: PatternSpec, causal: bool, seq_len: int):
    def mask_mod(b, h, q_idx, kv_idx):
        # kv_idx < seq_len drops the zero padding up to the next block boundary
        return pattern_allows(q_idx, kv_idx, spec, causal) & (kv_idx < seq_len)

    return mask_mod


@lru_cache(maxsize=64)
def get_block_mask(seq_len: int, spec: PatternSpec, causal: bool, device: torch.device) -> BlockMask:
    """Static BlockMask, built once per (sequence length, pattern, causal, device).

    Tiles wholly inside the pattern become "full" blocks (FlexAttention skips mask_mod there); only
    causal diagonals, global-token edges and the padded tail are "partial".
    """
    padded = -(-seq_len // spec.block_size) * spec.block_size
    return create_block_mask(
        _mask_mod_for(spec, causal, seq_len),
        B=None,
        H=None,
        Q_LEN=padded,
        KV_LEN=padded,
        device=device,
        BLOCK_SIZE=spec.block_size,
        # compiled construction avoids materialising the padded**2 mask on GPU; eager on CPU (tests)
        _compile=device.type == "cuda",
    )


def _flex_plain(q, k, v, block_mask, scale, kernel_options):
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options)


def _flex_key_padding(q, k, v, block_mask, scale, kernel_options, key_keep):
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(key_keep[b, kv_idx], score, -float("inf"))

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          kernel_options=kernel_options)


def _flex_full_mask(q, k, v, block_mask, scale, kernel_options, keep):
    # keep: (B, 1 or H, S, S); rare (packed sequences, custom 4-D masks), costs one gather per score
    per_head = keep.shape[1] > 1

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(keep[b, h if per_head else 0, q_idx, kv_idx], score, -float("inf"))

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          kernel_options=kernel_options)


_COMPILED: dict = {}


def _maybe_compiled(fn, device: torch.device, mode: str | None):
    # FlexAttention must be compiled on GPU (eager is an O(S^2)-memory decomposition); CPU stays
    # eager, which is what the CPU tests exercise (forward only: eager CPU Flex has no backward).
    if device.type != "cuda":
        return fn
    if (fn, mode) not in _COMPILED:
        # one specialisation per (shape, pattern); dynamo's default of 8 would silently drop to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[fn, mode] = torch.compile(fn, dynamic=False, mode=mode)
    return _COMPILED[fn, mode]


def key_padding_from_mask(keep: torch.Tensor, causal: bool) -> torch.Tensor | None:
    """If the 4-D bool mask ``keep`` (B, 1, S, S) is exactly "base pattern AND key padding" (what
    transformers' sdpa_mask produces for padded batches), return the (B, S) key padding; else None."""
    if keep.shape[1] != 1:
        return None
    key_keep = keep[:, 0].any(dim=1)  # keys some query may see
    s = keep.shape[-1]
    base = torch.ones(s, s, dtype=torch.bool, device=keep.device)
    if causal:
        base = base.tril()
    if torch.equal(keep[:, 0], base[None] & key_keep[:, None, :]):
        return key_keep
    return None


def flex_pixelfly_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spec: PatternSpec,
    causal: bool,
    scale: float,
    keep: torch.Tensor | None = None,
    kernel_options: dict | None = None,
    compile_mode: str | None = None,
) -> torch.Tensor:
    """Pixelfly attention through FlexAttention; q/k/v (B, H, S, D), equal lengths. ``keep`` is an
    optional (B, 1 or H, S, S) bool mask (True = may attend) ANDed with the pattern. Sequences are
    zero-padded to a multiple of the block size and the output is cut back. Returns (B, H, S, D).
    ``kernel_options`` / ``compile_mode`` go to flex_attention / torch.compile (benchmark variants)."""
    b, _, s, _ = query.shape
    padded = -(-s // spec.block_size) * spec.block_size
    pad = padded - s
    if pad:
        query, key, value = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
    block_mask = get_block_mask(s, spec, causal, query.device)
    device = query.device
    if keep is None:
        out = _maybe_compiled(_flex_plain, device, compile_mode)(query, key, value, block_mask, scale, kernel_options)
    else:
        key_keep = key_padding_from_mask(keep, causal)
        if key_keep is not None:
            key_keep = torch.nn.functional.pad(key_keep, (0, pad), value=False)
            out = _maybe_compiled(_flex_key_padding, device, compile_mode)(
                query, key, value, block_mask, scale, kernel_options, key_keep)
        else:
            keep = torch.nn.functional.pad(keep, (0, pad, 0, pad), value=False)
            out = _maybe_compiled(_flex_full_mask, device, compile_mode)(
                query, key, value, block_mask, scale, kernel_options, keep)
    return out[:, :, :s] if pad else out
