"""Question: in which order should our attention kernels launch their programs? (Heavy blocks first: 10-14% off
forward+backward at S = 4096, docs/dev/benchmarks-log.md.) Last run at commit 3225a1d: it sets the kernels' module
global HEAVY_FACTOR, a research knob that leaves the library, so it need not run against later commits.

Our Triton attention kernels (kernels/block_sparse_attention.py) against SDPA and FlexAttention at S = 4096.

    python research/probe_attention_kernel.py [--json PATH]             # GPU, ~2 min

FlexAttention visits this pattern at 0.43-0.51 of cuDNN's rate per tile; 2.5x over SDPA at 23% block density needs
0.58. This script times the kernels (through the custom op that the registered attention function calls) next to
SDPA and Flex at S = 4096, batch 4, 16 heads, bf16, under do_bench and replayed from a CUDA graph, and prints the
per-tile rate against SDPA for three launch orders. Outputs and gradients are checked against fp32 SDPA with the
pattern as a mask.
"""
import argparse
import json

import torch
import torch.nn.functional as F
import triton

from pixelfly_kernels import block_sparse_attention as kernels
from pixelfly_kernels.butterfly_attention import PatternSpec, block_density, flex_pixelfly_attention
from tune_attention import errors_vs_masked_sdpa  # research/tune_attention.py


def ordered(heavy_factor, spec, causal, scale):
    """The kernels launched in one order; the backward reads the setting the forward has just made."""
    def attend(q, k, v):
        kernels.HEAVY_FACTOR = heavy_factor
        return kernels.block_sparse_attention(q, k, v, spec, causal, scale)

    return attend


def autotuner_picks():
    """Every autotuner key (S, table width, heavy blocks, d, causal, bias, block) and its pick, per kernel."""
    return {name: {str(key): str(config) for key, config in tuned.cache.items()}
            for name, tuned in (("fwd", kernels._fwd_tuned), ("dkdv", kernels._dkdv_tuned), ("dq", kernels._dq_tuned))}


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
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    S, B, H, spec, rows = 4096, 4, 16, PatternSpec(128, None, 3, 128), []
    # launch orders (kernels.HEAVY_FACTOR): the default (heavy blocks first, then head by head), every program
    # heaviest block first, and head by head in block order
    orders = {"own": 2.0, "own_all_heaviest_first": 0.0, "own_by_head": float("inf")}
    ours = ("flex_g128", *orders)
    for causal in (True, False):
        density = block_density(S, spec, causal)
        for d in (64, 128):
            q, k, v, grad = (torch.randn(B, H, S, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            scale = d ** -0.5
            variants = {"sdpa": lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal),
                        "flex_g128": lambda a, b, c: flex_pixelfly_attention(a, b, c, spec, causal, scale),
                        **{name: ordered(factor, spec, causal, scale) for name, factor in orders.items()}}
            row = dict(causal=causal, head_dim=d, density=density,
                       own_errors=errors_vs_masked_sdpa(variants["own"], (q, k, v), grad, spec, causal))
            for timing in ("do_bench", "cuda_graph"):
                ms = {name: timed(attn, q, k, v, grad, timing == "cuda_graph") for name, attn in variants.items()}
                row[timing] = dict(fwd_ms={n: t[0] for n, t in ms.items()}, fwd_bwd_ms={n: t[1] for n, t in ms.items()},
                                   rate_vs_sdpa={n: {"fwd": ms["sdpa"][0] * density / ms[n][0],
                                                     "fwd_bwd": ms["sdpa"][1] * density / ms[n][1]} for n in ours})
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
                           rows=rows, own_configs=autotuner_picks()), f, indent=1)


if __name__ == "__main__":
    main()
