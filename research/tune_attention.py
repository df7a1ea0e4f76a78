"""Question: where does FlexAttention lose time on the Pixelfly pattern? (Partial blocks: 128 global tokens, one
whole block, are 1.1-1.3x faster than 64; no Flex option reached 2.5x SDPA causal at S = 4096.) Last run at commit
e6521dc: its g128_tilemask variant needs get_block_mask's partial_tile_mask, a research knob that leaves the library.

Variants side by side with SDPA (H200, bf16).

    python research/tune_attention.py --json $OUT/tune_attn.json      # GPU, ~4 min

For each (causal, head_dim) at one sequence length it times forward alone and forward+backward of:
  sdpa          torch SDPA (cuDNN/flash), the bar
  g64           the pattern with 64 global tokens (half of the first 128-token key block: a partial block)
  g128          global tokens = one whole block (every first-column tile becomes a full block)
  g0            no global tokens (sparse part only)
  g128_flash    g128 on FlexAttention's CuTe "FLASH" backend (FlashAttention-4's sm90 kernels; needs the
                flash-attn-4 and nvidia-cutlass-dsl wheels, see docs/dev/optimisation-notes.md; an error is recorded otherwise)
  g128_tma      g128 with FlexAttention's TMA loads (kernel_options USE_TMA)
  g128_autotune g128 compiled with mode="max-autotune-no-cudagraphs" (autotunes Flex's tile configs)
  g128_tilemask g128 with the partial tiles' mask_mod reduced to causality + tail (get_block_mask's
                partial_tile_mask): what the pattern's per-score XOR arithmetic costs
  g128_safe     g128 telling Flex that no row is fully masked (kernel_options ROWS_GUARANTEED_SAFE; true here:
                every query keeps its own diagonal block and the global tokens), which skips its empty-row guard
  g128_safe_prescale  the same plus PRESCALE_QK (Q scaled once instead of every score; the error columns show
                what that costs in accuracy)
and the per-visited-tile rate relative to SDPA (1.0 = FlexAttention as fast per tile as cuDNN), plus each
variant's relative error (output and dQ) against fp32 SDPA with the pattern as a dense boolean mask.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from pixelfly_kernels.butterfly_attention import PatternSpec, block_density, dense_pattern, flex_pixelfly_attention
from pixelfly_hf.timing import median_ms

VARIANTS = {
    "g64": dict(n_global=64),
    "g128": dict(n_global=128),
    "g0": dict(n_global=0),
    "g128_flash": dict(n_global=128, kernel_options={"BACKEND": "FLASH"}),
    "g128_tma": dict(n_global=128, kernel_options={"USE_TMA": True}),
    "g128_autotune": dict(n_global=128, compile_mode="max-autotune-no-cudagraphs"),
    "g128_tilemask": dict(n_global=128, partial_tile_mask=True),
    "g128_safe": dict(n_global=128, kernel_options={"ROWS_GUARANTEED_SAFE": True}),
    "g128_safe_prescale": dict(n_global=128, kernel_options={"ROWS_GUARANTEED_SAFE": True, "PRESCALE_QK": True}),
}


def timed(attn, inputs, grad):
    """(forward ms, forward+backward ms), medians over rotating input sets."""
    def fwd_bwd(q, k, v):
        q.grad = k.grad = v.grad = None
        attn(q, k, v).backward(grad)

    with torch.no_grad():
        fwd = median_ms(attn, inputs)
    return fwd, median_ms(fwd_bwd, inputs)


def errors_vs_masked_sdpa(attn, inputs, grad, spec, causal):
    """Relative Frobenius errors of the output and of dQ, dK, dV against fp32 SDPA with the pattern as a boolean
    mask (default scale, 1/sqrt(head dim), as every caller uses)."""
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    out = attn(*ins)
    out.backward(grad)
    ref_ins = [t.detach().float().requires_grad_() for t in inputs]
    mask = dense_pattern(ins[0].shape[2], ins[0].shape[2], spec, causal, device=grad.device)
    ref = F.scaled_dot_product_attention(*ref_ins, attn_mask=mask)
    ref.backward(grad.float())

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    return {"out_rel_err": rel(out.detach(), ref.detach()),
            **{f"{name}_rel_err": rel(a.grad, b.grad) for name, a, b in zip(("dq", "dk", "dv"), ins, ref_ins)}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seq_len")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--causal", type=int, nargs="+", default=[1, 0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--budget-s", type=float, default=200.0, help="skip the remaining variants after this")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    s, b = args.seq_len, max(1, args.tokens // args.seq_len)
    start, rows = time.time(), []
    for causal in map(bool, args.causal):
        for d in args.head_dims:
            gen = torch.Generator(device="cuda").manual_seed(0)
            inputs = [[torch.randn(b, args.heads, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                       .requires_grad_(True) for _ in range(3)] for _ in range(2)]
            grad = torch.randn(b, args.heads, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            sdpa = timed(lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c), inputs, grad)
            rows.append(dict(causal=causal, head_dim=d, seq_len=s, batch=b, sdpa_fwd_ms=sdpa[0], sdpa_ms=sdpa[1],
                             inputs=inputs, grad=grad))
    # variants in the outer loop: when the budget runs out, the last (most expensive) variants are cut
    for name in args.variants:
        for row in rows:
            causal, d = row["causal"], row["head_dim"]
            if time.time() - start > args.budget_s:
                row[name] = "skipped: time budget"
                continue
            opts = dict(VARIANTS[name])
            spec = PatternSpec(128, None, 3, opts.pop("n_global"))
            t0 = time.time()
            try:
                fwd, total = timed(lambda q, k, v: flex_pixelfly_attention(q, k, v, spec, causal, d ** -0.5, **opts),
                                   row["inputs"], row["grad"])
            except Exception as err:  # report, don't hide: e.g. the FLASH backend without its packages
                row[name] = f"error: {type(err).__name__}: {err}"[:300]
                continue
            density = block_density(s, spec, causal)
            row[name] = dict(fwd_ms=fwd, ms=total, speedup=row["sdpa_ms"] / total,
                             fwd_speedup=row["sdpa_fwd_ms"] / fwd, density=density,
                             rate_vs_sdpa=row["sdpa_ms"] * density / total, compile_and_time_s=time.time() - t0,
                             **errors_vs_masked_sdpa(lambda q, k, v: flex_pixelfly_attention(q, k, v, spec, causal, d ** -0.5, **opts),
                                                     row["inputs"][0], row["grad"], spec, causal))
            print(name, json.dumps({k: v for k, v in row.items() if k not in ("inputs", "grad")}), flush=True)
    for row in rows:
        del row["inputs"], row["grad"]

    print(f"\nfwd+bwd speedup over SDPA (rate per visited tile vs SDPA), S={s}, batch {b}, {args.heads} heads, bf16")
    print(f"{'causal':>6} {'d':>4} {'sdpa ms':>8} " + " ".join(f"{n:>18}" for n in args.variants))
    for r in rows:
        cells = [f"{r[n]['speedup']:.2f}x ({r[n]['rate_vs_sdpa']:.2f})" if isinstance(r[n], dict) else r[n][:18]
                 for n in args.variants]
        print(f"{str(r['causal']):>6} {r['head_dim']:>4} {r['sdpa_ms']:>8.3f} " + " ".join(f"{c:>18}" for c in cells))
    print(f"total {time.time() - start:.0f} s")
    if args.json:
        meta = dict(torch=torch.__version__, device=torch.cuda.get_device_name(), heads=args.heads,
                    timing="median ms, triton do_bench, 2 rotating input sets")
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
