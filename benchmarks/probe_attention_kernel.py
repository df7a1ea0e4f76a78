"""Go/no-go probe for our own Pixelfly attention kernel (issue 4, causal S = 4096): forward and backward.

    python benchmarks/probe_attention_kernel.py [--json PATH]             # GPU, ~3 min
    TRITON_INTERPRET=1 python benchmarks/probe_attention_kernel.py --dry-run   # CPU check of the kernels

FlexAttention visits this pattern at 0.43-0.51 of cuDNN's rate per tile; 2.5x over SDPA at 23% block density needs
0.58. The pattern is static, so a kernel can take each query block's key blocks (and, for dK/dV, each key block's
query blocks) from small tables built once, and mask only the causal diagonal tile. This script times such kernels
(forward saving the log-sum-exp; backward as FlashAttention-2: one kernel for dK/dV per key tile, one for dQ per
query tile) next to SDPA and Flex at S = 4096, batch 4, 16 heads, bf16, under do_bench and replayed from a CUDA
graph, and prints the per-tile rate against SDPA. At >= 0.6 the kernels are worth moving into kernels/
(benchmarks/NOTES.md, "our own kernel"). Session 6 measured 0.52 causal / 0.63 bidirectional at d = 64, below Flex
at d = 128: the route stays here. Outputs and gradients are checked against fp32 SDPA with the pattern as a mask.
"""
import argparse
import json
import os
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pixelfly_kernels.butterfly_attention import PatternSpec, block_density, dense_pattern, flex_pixelfly_attention
from tune_attention import errors_vs_masked_sdpa  # benchmarks/tune_attention.py

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634


@triton.jit
def _rows(base, offs, offs_d, stride_s, UPCAST: tl.constexpr):
    """The (len(offs), D) tile of rows offs of one head's (S, D) slab; fp32 in the interpreter."""
    x = tl.load(base + offs[:, None] * stride_s + offs_d[None, :])
    return x.to(tl.float32) if UPCAST else x


@triton.jit
def _rows_t(base, offs, offs_d, stride_s, UPCAST: tl.constexpr):
    """The same tile transposed, (D, len(offs)), loaded as such."""
    x = tl.load(base + offs[None, :] * stride_s + offs_d[:, None])
    return x.to(tl.float32) if UPCAST else x


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_base, v_base, key0, offs_m, offs_d, stride_s, qk_scale,
                  MASK: tl.constexpr, PATTERN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over one pattern block of keys, BLOCK_N at a time; MASK: the causal diagonal block."""
    for sub in tl.static_range(0, PATTERN_BLOCK, BLOCK_N):
        offs_n = key0 + sub + tl.arange(0, BLOCK_N)
        k = _rows_t(k_base, offs_n, offs_d, stride_s, UPCAST)
        v = _rows(v_base, offs_n, offs_d, stride_s, UPCAST)
        s = tl.dot(q, k) * qk_scale  # log2 units
        if MASK:
            # rows wholly masked here already hold a finite maximum: the diagonal block comes last, its
            # sub-blocks in order, and every query sees at least one earlier key
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attention_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, rows_ptr, n_rows_ptr, qk_scale, S, stride_s, width,
                   D: tl.constexpr, CAUSAL: tl.constexpr, PATTERN_BLOCK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    base = bh.to(tl.int64) * S * stride_s
    qb = (pid_m * BLOCK_M) // PATTERN_BLOCK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = _rows(q_ptr + base, offs_m, offs_d, stride_s, UPCAST)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    k_base, v_base = k_ptr + base, v_ptr + base
    for i in range(tl.load(n_rows_ptr + qb)):  # whole blocks: no mask code in this loop
        key0 = tl.load(rows_ptr + qb * width + i) * PATTERN_BLOCK
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, key0, offs_m, offs_d, stride_s, qk_scale,
                                      False, PATTERN_BLOCK, BLOCK_N, UPCAST)
    if CAUSAL:
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, qb * PATTERN_BLOCK, offs_m, offs_d, stride_s,
                                      qk_scale, True, PATTERN_BLOCK, BLOCK_N, UPCAST)
    tl.store(lse_ptr + bh.to(tl.int64) * S + offs_m, m_i + tl.math.log2(l_i))
    acc = acc / l_i[:, None]
    tl.store(o_ptr + base + offs_m[:, None] * stride_s + offs_d[None, :], acc.to(o_ptr.dtype.element_ty))


@triton.jit
def _row_dot(o_ptr, do_ptr, delta_ptr, D: tl.constexpr, BLOCK: tl.constexpr):
    """delta = rowsum(O * dO), the softmax backward's correction term, over all (batch, head, position) rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    o = tl.load(o_ptr + rows[:, None] * D + offs_d[None, :]).to(tl.float32)
    do = tl.load(do_ptr + rows[:, None] * D + offs_d[None, :]).to(tl.float32)
    tl.store(delta_ptr + rows, tl.sum(o * do, 1))


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, query0, offs_n, offs_d, stride_s, qk_scale,
                MASK: tl.constexpr, PATTERN_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr):
    """dK and dV contributions of one pattern block of queries, BLOCK_M at a time (P recomputed from the LSE).
    Adding dQ here atomically instead of in a kernel of its own measured no faster (benchmarks/NOTES.md)."""
    for sub in tl.static_range(0, PATTERN_BLOCK, BLOCK_M):
        offs_m = query0 + sub + tl.arange(0, BLOCK_M)
        q_t = _rows_t(q_base, offs_m, offs_d, stride_s, UPCAST)
        do = _rows(do_base, offs_m, offs_d, stride_s, UPCAST)
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
        p_t = tl.math.exp2(tl.dot(k, q_t) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk)
    return dk, dv


@triton.jit
def _attention_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cols_ptr, n_cols_ptr,
                    qk_scale, scale, S, stride_s, width,
                    D: tl.constexpr, CAUSAL: tl.constexpr, PATTERN_BLOCK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    base = bh.to(tl.int64) * S * stride_s
    kb = (pid_n * BLOCK_N) // PATTERN_BLOCK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = _rows(k_ptr + base, offs_n, offs_d, stride_s, UPCAST)
    v = _rows(v_ptr + base, offs_n, offs_d, stride_s, UPCAST)
    dk = tl.zeros((BLOCK_N, D), tl.float32)
    dv = tl.zeros((BLOCK_N, D), tl.float32)
    q_base, do_base = q_ptr + base, do_ptr + base
    lse_base, delta_base = lse_ptr + bh.to(tl.int64) * S, delta_ptr + bh.to(tl.int64) * S
    for i in range(tl.load(n_cols_ptr + kb)):
        query0 = tl.load(cols_ptr + kb * width + i) * PATTERN_BLOCK
        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, query0, offs_n, offs_d, stride_s,
                             qk_scale, False, PATTERN_BLOCK, BLOCK_M, UPCAST)
    if CAUSAL:
        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kb * PATTERN_BLOCK, offs_n, offs_d,
                             stride_s, qk_scale, True, PATTERN_BLOCK, BLOCK_M, UPCAST)
    out = base + offs_n[:, None] * stride_s + offs_d[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty))
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty))


@triton.jit
def _dq_block(dq, q, do, lse, delta, k_base, v_base, key0, offs_m, offs_d, stride_s, qk_scale,
              MASK: tl.constexpr, PATTERN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """dQ contribution of one pattern block of keys, BLOCK_N at a time."""
    for sub in tl.static_range(0, PATTERN_BLOCK, BLOCK_N):
        offs_n = key0 + sub + tl.arange(0, BLOCK_N)
        k_t = _rows_t(k_base, offs_n, offs_d, stride_s, UPCAST)
        v_t = _rows_t(v_base, offs_n, offs_d, stride_s, UPCAST)
        p = tl.math.exp2(tl.dot(q, k_t) * qk_scale - lse[:, None])
        if MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        ds = p * (tl.dot(do, v_t) - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq)
    return dq


@triton.jit
def _attention_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, rows_ptr, n_rows_ptr,
                  qk_scale, scale, S, stride_s, width,
                  D: tl.constexpr, CAUSAL: tl.constexpr, PATTERN_BLOCK: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    base = bh.to(tl.int64) * S * stride_s
    qb = (pid_m * BLOCK_M) // PATTERN_BLOCK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = _rows(q_ptr + base, offs_m, offs_d, stride_s, UPCAST)
    do = _rows(do_ptr + base, offs_m, offs_d, stride_s, UPCAST)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * S + offs_m)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * S + offs_m)
    dq = tl.zeros((BLOCK_M, D), tl.float32)
    k_base, v_base = k_ptr + base, v_ptr + base
    for i in range(tl.load(n_rows_ptr + qb)):
        key0 = tl.load(rows_ptr + qb * width + i) * PATTERN_BLOCK
        dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, key0, offs_m, offs_d, stride_s, qk_scale,
                       False, PATTERN_BLOCK, BLOCK_N, UPCAST)
    if CAUSAL:
        dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, qb * PATTERN_BLOCK, offs_m, offs_d, stride_s, qk_scale,
                       True, PATTERN_BLOCK, BLOCK_N, UPCAST)
    tl.store(dq_ptr + base + offs_m[:, None] * stride_s + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty))


def _configs(tiles):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in tiles]


_KEY = ["width", "D", "CAUSAL"]
_fwd_tuned = triton.autotune(_configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2),
                                       (64, 64, 4, 4), (64, 128, 4, 3)]), key=_KEY)(_attention_fwd)
# (query rows per step, key rows per program) for dK/dV; (query rows per program, key rows per step) for dQ
_dkdv_tuned = triton.autotune(_configs([(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)]),
                              key=_KEY)(_attention_dkdv)
_dq_tuned = triton.autotune(_configs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)]),
                            key=_KEY)(_attention_dq)


class BlockTables(NamedTuple):
    """Whole pattern blocks: per query block the key blocks it sees (rows), per key block the query blocks that see
    it (cols), each padded to one width, with counts. The causal diagonal is not listed: the kernels mask it apart."""
    rows: torch.Tensor
    n_rows: torch.Tensor
    cols: torch.Tensor
    n_cols: torch.Tensor


def block_tables(seq_len: int, spec: PatternSpec, causal: bool, device) -> BlockTables:
    """Checks that the only partial blocks are the causal diagonal's lower triangles, which the kernels mask."""
    P, nb = spec.block_size, seq_len // spec.block_size
    if seq_len % P:
        raise ValueError(f"seq_len {seq_len} must be a multiple of the pattern block {P} for this probe")
    tiles = dense_pattern(seq_len, seq_len, spec, causal).view(nb, P, nb, P).permute(0, 2, 1, 3)
    seen, whole = tiles.any(3).any(2), tiles.all(3).all(2)
    diagonal = torch.eye(nb, dtype=torch.bool)
    if causal:
        triangles = torch.ones(P, P, dtype=torch.bool).tril().expand(nb, P, P)
        if not (seen & ~whole).equal(diagonal) or not tiles[diagonal].equal(triangles):
            raise ValueError(f"{spec}: partial blocks other than the causal diagonal; these kernels cannot mask them")
        whole &= ~diagonal
    elif not seen.equal(whole):
        raise ValueError(f"{spec}: partial blocks in a bidirectional pattern; these kernels cannot mask them")
    width = max(1, int(whole.sum(1).max()), int(whole.sum(0).max()))

    def padded(m):
        table = torch.zeros(nb, width, dtype=torch.int32)
        for i in range(nb):
            found = m[i].nonzero().flatten()
            table[i, :len(found)] = found.to(torch.int32)
        return table.to(device), m.sum(1).to(torch.int32).to(device)

    return BlockTables(*padded(whole), *padded(whole.T))


def _launch(kernel, tuned, grid_rows, args, meta, config):
    """Autotuned on the GPU; a fixed (BLOCK_M, BLOCK_N) in the interpreter or when given."""
    if config is None and not INTERPRET:
        tuned[grid_rows](*args, **meta)
    else:
        bm, bn = config or (64, 64)
        kernel[grid_rows({"BLOCK_M": bm, "BLOCK_N": bn})](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)


class PixelflyAttention(torch.autograd.Function):
    """q, k, v: (B, H, S, D) contiguous, S a multiple of the pattern block. config: fixed tiles for every kernel."""

    @staticmethod
    def forward(ctx, q, k, v, tables, causal, scale, pattern_block=128, config=None):
        B, H, S, D = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(B * H, S, device=q.device, dtype=torch.float32)
        meta = dict(D=D, CAUSAL=causal, PATTERN_BLOCK=pattern_block, UPCAST=INTERPRET)
        args = (q, k, v, out, lse, tables.rows, tables.n_rows, scale * LOG2E, S, D, tables.rows.shape[1])
        _launch(_attention_fwd, _fwd_tuned, lambda m: (S // m["BLOCK_M"], B * H), args, meta, config)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tables, ctx.scale, ctx.meta, ctx.config = tables, scale, meta, config
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        B, H, S, D = q.shape
        grad, t, scale = grad.contiguous(), ctx.tables, ctx.scale
        delta = torch.empty_like(lse)
        _row_dot[(B * H * S // 128,)](out, grad, delta, D=D, BLOCK=128)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = (scale * LOG2E, scale, S, D, t.rows.shape[1])
        _launch(_attention_dkdv, _dkdv_tuned, lambda m: (S // m["BLOCK_N"], B * H),
                (q, k, v, grad, lse, delta, dk, dv, t.cols, t.n_cols, *common), ctx.meta, ctx.config)
        _launch(_attention_dq, _dq_tuned, lambda m: (S // m["BLOCK_M"], B * H),
                (q, k, v, grad, lse, delta, dq, t.rows, t.n_rows, *common), ctx.meta, ctx.config)
        return dq, dk, dv, None, None, None, None, None


def dry_run():
    """CPU, interpreter, fp32: the kernels against fp32 SDPA with the pattern as a mask, two tile shapes."""
    spec, errors = PatternSpec(128, None, 3, 128), {}
    for causal in (True, False):
        q, k, v, grad = (torch.randn(1, 2, 512, 32) for _ in range(4))
        tables = block_tables(512, spec, causal, "cpu")
        for config in ((64, 64), (32, 128)):
            errs = errors_vs_masked_sdpa(lambda a, b, c: PixelflyAttention.apply(a, b, c, tables, causal, 32 ** -0.5,
                                                                                 128, config),
                                         (q, k, v), grad, spec, causal)
            errors.update({f"causal={causal} tiles={config} {name}": err for name, err in errs.items()})
    print(json.dumps(errors))
    return errors


def timed(attn, q, k, v, grad, cuda_graph):
    """Median ms of the forward alone and of forward + backward; cuda_graph: replayed from a CUDA graph, so the
    host's launch time (Python launchers, the backward's thread) is left out."""
    import triton.testing

    def step():
        for t in (q, k, v):
            t.grad = None
        attn(q, k, v).backward(grad)

    if cuda_graph:
        return tuple(triton.testing.do_bench_cudagraph(fn, return_mode="median") for fn in (lambda: attn(q, k, v), step))
    return tuple(triton.testing.do_bench(fn, return_mode="median") for fn in (lambda: attn(q, k, v), step))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.dry_run:
        if not INTERPRET:
            parser.error("--dry-run runs the kernels on CPU: set TRITON_INTERPRET=1")
        errors = dry_run()
        sys.exit(0 if all(err < 1e-4 for err in errors.values()) else 1)  # NaN fails too

    S, B, H, spec, rows = 4096, 4, 16, PatternSpec(128, None, 3, 128), []
    ours = ("flex_g128", "own")
    for causal in (True, False):
        tables = block_tables(S, spec, causal, "cuda")
        density = block_density(S, spec, causal)
        for d in (64, 128):
            q, k, v, grad = (torch.randn(B, H, S, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            scale = d ** -0.5
            variants = {"sdpa": lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal),
                        "flex_g128": lambda a, b, c: flex_pixelfly_attention(a, b, c, spec, causal, scale),
                        "own": lambda a, b, c: PixelflyAttention.apply(a, b, c, tables, causal, scale)}
            row = dict(causal=causal, head_dim=d, density=density,
                       own_errors=errors_vs_masked_sdpa(variants["own"], (q, k, v), grad, spec, causal))
            for timing in ("do_bench", "cuda_graph"):
                ms = {name: timed(attn, q, k, v, grad, timing == "cuda_graph") for name, attn in variants.items()}
                row[timing] = dict(fwd_ms={n: t[0] for n, t in ms.items()}, fwd_bwd_ms={n: t[1] for n, t in ms.items()},
                                   rate_vs_sdpa={n: {"fwd": ms["sdpa"][0] * density / ms[n][0],
                                                     "fwd_bwd": ms["sdpa"][1] * density / ms[n][1]} for n in ours})
            row["own_configs"] = {name: str(t.best_config) for name, t in
                                  (("fwd", _fwd_tuned), ("dkdv", _dkdv_tuned), ("dq", _dq_tuned))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for timing in ("do_bench", "cuda_graph"):
        print(f"\nS={S}, batch {B}, {H} heads, bf16, {timing}: ms (per-tile rate vs SDPA; go: own fwd+bwd >= 0.6)")
        for r in rows:
            t = r[timing]
            cells = "  ".join(f"{n} {t['fwd_ms'][n]:.3f} / {t['fwd_bwd_ms'][n]:.3f}"
                              + (f" ({t['rate_vs_sdpa'][n]['fwd']:.2f}, {t['rate_vs_sdpa'][n]['fwd_bwd']:.2f})" if n != "sdpa" else "")
                              for n in ("sdpa", *ours))
            print(f"  causal={r['causal']!s:<5} d={r['head_dim']:<4} {cells}")
    for r in rows:
        print(f"  causal={r['causal']!s:<5} d={r['head_dim']:<4} own max error {max(r['own_errors'].values()):.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, triton=triton.__version__, device=torch.cuda.get_device_name(),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
