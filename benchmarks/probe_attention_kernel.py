"""Go/no-go probe for our own Pixelfly attention kernel (issue 4, causal S = 4096): forward only.

    python benchmarks/probe_attention_kernel.py [--json PATH]             # GPU, ~2 min
    TRITON_INTERPRET=1 python benchmarks/probe_attention_kernel.py --dry-run   # CPU check of the kernel

FlexAttention visits this pattern at 0.43-0.51 of cuDNN's rate per tile; 2.5x over SDPA at 23% block density needs
0.58. The pattern is static, so a kernel can take each query block's key blocks from a small table built once and
mask only the causal diagonal tile. This script times that forward kernel next to SDPA's and Flex's forwards (S =
4096, batch 4, 16 heads, bf16) and prints the per-tile rate against SDPA: at >= 0.6 the backward is worth writing
(benchmarks/NOTES.md, "our own kernel"); below, the route is dropped. Output is checked against fp32 SDPA with the
pattern as a boolean mask.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pixelfly_kernels.butterfly_attention import PatternSpec, block_density, dense_pattern, flex_pixelfly_attention

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_base, v_base, key0, offs_m, offs_d, stride_s, qk_scale,
                  MASK: tl.constexpr, PATTERN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over one pattern block of keys, BLOCK_N at a time; MASK: the causal diagonal block."""
    for sub in tl.static_range(0, PATTERN_BLOCK, BLOCK_N):
        offs_n = key0 + sub + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[None, :] * stride_s + offs_d[:, None])  # (D, BLOCK_N)
        v = tl.load(v_base + offs_n[:, None] * stride_s + offs_d[None, :])  # (BLOCK_N, D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
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
def _pixelfly_attention_fwd(q_ptr, k_ptr, v_ptr, o_ptr, table_ptr, n_full_ptr, qk_scale, stride_bh, stride_s, max_len,
                            D: tl.constexpr, CAUSAL: tl.constexpr, PATTERN_BLOCK: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * stride_bh
    qb = (pid_m * BLOCK_M) // PATTERN_BLOCK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + base + offs_m[:, None] * stride_s + offs_d[None, :])
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    k_base, v_base = k_ptr + base, v_ptr + base
    for i in range(tl.load(n_full_ptr + qb)):  # whole blocks: no mask code in this loop
        key0 = tl.load(table_ptr + qb * max_len + i) * PATTERN_BLOCK
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, key0, offs_m, offs_d, stride_s, qk_scale,
                                      False, PATTERN_BLOCK, BLOCK_N, UPCAST)
    if CAUSAL:
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, qb * PATTERN_BLOCK, offs_m, offs_d, stride_s,
                                      qk_scale, True, PATTERN_BLOCK, BLOCK_N, UPCAST)
    acc = acc / l_i[:, None]
    tl.store(o_ptr + base + offs_m[:, None] * stride_s + offs_d[None, :], acc.to(o_ptr.dtype.element_ty))


_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 4),
                                  (64, 128, 4, 3)]]
_tuned = triton.autotune(configs=_CONFIGS, key=["max_len", "D", "CAUSAL"])(_pixelfly_attention_fwd)


def block_tables(seq_len: int, spec: PatternSpec, causal: bool, device):
    """Per query block, the key blocks it sees whole (padded table + counts); checks that the only partial
    blocks are the causal diagonal's lower triangles, which the kernel masks itself."""
    P, nb = spec.block_size, seq_len // spec.block_size
    if seq_len % P:
        raise ValueError(f"seq_len {seq_len} must be a multiple of the pattern block {P} for this probe")
    tiles = dense_pattern(seq_len, seq_len, spec, causal).view(nb, P, nb, P).permute(0, 2, 1, 3)
    seen, whole = tiles.any(3).any(2), tiles.all(3).all(2)
    diagonal = torch.eye(nb, dtype=torch.bool)
    if causal:
        if not (seen & ~whole).equal(diagonal) or not tiles[diagonal].equal(torch.ones(P, P, dtype=torch.bool).tril().expand(nb, P, P)):
            raise ValueError(f"{spec}: partial blocks other than the causal diagonal; this kernel cannot mask them")
        whole &= ~diagonal
    elif not seen.equal(whole):
        raise ValueError(f"{spec}: partial blocks in a bidirectional pattern; this kernel cannot mask them")
    n_full = whole.sum(1).to(torch.int32)
    table = torch.zeros(nb, max(1, int(n_full.max())), dtype=torch.int32)
    for qb in range(nb):
        keys = whole[qb].nonzero().flatten()
        table[qb, :len(keys)] = keys.to(torch.int32)
    return table.to(device), n_full.to(device)


def pixelfly_attention_fwd(q, k, v, table, n_full, causal: bool, scale: float, pattern_block: int = 128, config=None):
    """q, k, v: (B, H, S, D) contiguous, S a multiple of pattern_block."""
    B, H, S, D = q.shape
    out = torch.empty_like(q)
    args = (q, k, v, out, table, n_full, scale * 1.4426950408889634, S * D, D, table.shape[1])
    meta = dict(D=D, CAUSAL=causal, PATTERN_BLOCK=pattern_block, UPCAST=INTERPRET)
    if config is None and not INTERPRET:
        _tuned[lambda m: (S // m["BLOCK_M"], B * H)](*args, **meta)
    else:
        bm, bn = config or (64, 64)
        _pixelfly_attention_fwd[(S // bm, B * H)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)
    return out


def masked_sdpa_fp32(q, k, v, spec, causal, scale):
    mask = dense_pattern(q.shape[2], q.shape[2], spec, causal, device=q.device)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)


def rel_err(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


def dry_run():
    """CPU, interpreter, fp32: the kernel against fp32 SDPA with the pattern as a mask, two tile shapes."""
    spec, errors = PatternSpec(128, None, 3, 128), {}
    for causal in (True, False):
        q, k, v = (torch.randn(1, 2, 512, 32) for _ in range(3))
        table, n_full = block_tables(512, spec, causal, "cpu")
        want = masked_sdpa_fp32(q, k, v, spec, causal, 32 ** -0.5)
        for config in ((64, 64), (128, 32)):
            out = pixelfly_attention_fwd(q, k, v, table, n_full, causal, 32 ** -0.5, config=config)
            errors[f"causal={causal} tiles={config}"] = rel_err(out, want)
    print(json.dumps(errors))
    return errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.dry_run:
        if not INTERPRET:
            parser.error("--dry-run runs the kernel on CPU: set TRITON_INTERPRET=1")
        errors = dry_run()
        sys.exit(0 if all(err < 1e-4 for err in errors.values()) else 1)  # NaN fails too
    import triton.testing

    S, B, H, spec, rows = 4096, 4, 16, PatternSpec(128, None, 3, 128), []
    for causal in (True, False):
        table, n_full = block_tables(S, spec, causal, "cuda")
        density = block_density(S, spec, causal)
        for d in (64, 128):
            q, k, v = (torch.randn(B, H, S, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            scale = d ** -0.5
            own = pixelfly_attention_fwd(q, k, v, table, n_full, causal, scale)
            err = rel_err(own, masked_sdpa_fp32(q, k, v, spec, causal, scale))
            ms = {name: triton.testing.do_bench(fn, return_mode="median") for name, fn in (
                ("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)),
                ("flex_g128", lambda: flex_pixelfly_attention(q, k, v, spec, causal, scale)),
                ("own", lambda: pixelfly_attention_fwd(q, k, v, table, n_full, causal, scale)))}
            row = dict(causal=causal, head_dim=d, density=density, ms=ms, own_rel_err=err,
                       rate_vs_sdpa={n: ms["sdpa"] * density / ms[n] for n in ("flex_g128", "own")},
                       own_config=str(_tuned.best_config))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nforward, S={S}, batch {B}, {H} heads, bf16: per-tile rate vs SDPA (go: own >= 0.6)")
    for r in rows:
        print(f"  causal={r['causal']!s:<5} d={r['head_dim']:<4} sdpa {r['ms']['sdpa']:.3f} ms  flex {r['ms']['flex_g128']:.3f} ms "
              f"({r['rate_vs_sdpa']['flex_g128']:.2f})  own {r['ms']['own']:.3f} ms ({r['rate_vs_sdpa']['own']:.2f})  "
              f"err {r['own_rel_err']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, triton=triton.__version__, device=torch.cuda.get_device_name(),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
