"""Pixelfly attention vs dense SDPA, forward + backward, bf16 (H200).

    python benchmarks/bench_attention.py --json $OUT/attn.json        # GPU, ~3-4 min (mostly compiles)
    python benchmarks/bench_attention.py --dry-run                    # CPU smoke test, tiny shapes
    python benchmarks/bench_attention.py --replot attn.json --plot attn.png   # the PNG of a finished run

For every (causal, head_dim, seq_len) it times, in the same process:
  sdpa      torch SDPA (cuDNN/Flash), is_causal for decoders
  pixelfly  the registered attention function forced onto the sparse path (our Triton kernels on the GPU,
            kernels/block_sparse_attention.py)
  flex      the same pattern through FlexAttention (what the function runs where the kernels do not apply)
  chosen    what the function does with the default settings (choose_attention: dense SDPA where
            the sparse path cannot win)
Median of triton.testing.do_bench, or of CUDA graph replays with --cuda-graphs (the GPU's time alone). Also reports the tile density and the max error of the sparse
path against SDPA given the same pattern as a dense boolean mask (S = 1024 only, to stay cheap).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import transformers

from pixelfly_hf.config import PixelflyAttentionConfig
from pixelfly_hf.layers.attention import pattern_of, choose_attention, pixelfly_attention_forward
from pixelfly_kernels.butterfly_attention import block_density, dense_pattern, flex_pixelfly_attention
from pixelfly_hf import timing


class _Module(torch.nn.Module):
    def __init__(self, causal: bool, settings: PixelflyAttentionConfig):
        super().__init__()
        self.is_causal = causal
        self.config = transformers.PretrainedConfig(pixelfly_attention=settings.to_dict())


def _sdpa(q, k, v, causal):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _pixelfly(module):
    def run(q, k, v, causal):
        return pixelfly_attention_forward(module, q, k, v, None)[0].transpose(1, 2)  # back to (B, H, S, D)

    return run


def _flex(settings):
    def run(q, k, v, causal):
        return flex_pixelfly_attention(q, k, v, pattern_of(settings), causal, q.shape[-1] ** -0.5)

    return run


def _fwd_bwd(attn, q, k, v, causal):
    grad = torch.randn_like(q)

    def step():
        for t in (q, k, v):
            t.grad = None
        attn(q, k, v, causal).backward(grad)

    return step


def plot(rows, title, path):
    """Speedup over SDPA against sequence length, one colour per (causal, head dim): our kernels solid, Flex dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    cases = sorted({(r["causal"], r["head_dim"]) for r in rows}, key=lambda case: (not case[0], case[1]))
    for colour, (causal, d) in enumerate(cases):
        case = sorted((r for r in rows if (r["causal"], r["head_dim"]) == (causal, d)), key=lambda r: r["seq_len"])
        label = f"{'causal' if causal else 'bidirectional'}, head dim {d}"
        for key, style, name in (("pixelfly", "-o", "Pixelfly"), ("flex", "--", "Flex")):
            points = [(r["seq_len"], r[f"{key}_speedup"]) for r in case if r[f"{key}_speedup"]]
            if points:
                ax.plot(*zip(*points), style, color=f"C{colour}", label=f"{name}, {label}")
    seq_lens = sorted({r["seq_len"] for r in rows})
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(seq_lens, [str(s) for s in seq_lens])
    ax.set(xlabel="sequence length (tokens)", ylabel="speedup over SDPA, forward + backward", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (reference path), checks the script")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 1024])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seq_len per measurement")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=210.0, help="skip remaining sparse configs after this")
    parser.add_argument("--cuda-graphs", action="store_true", help="time CUDA graph replays (GPU time only)")
    parser.add_argument("--plot", help="write a PNG of the speedups here")
    parser.add_argument("--replot", metavar="JSON", help="with --plot: plot this finished run instead of measuring")
    args = parser.parse_args(argv)
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot PATH for the PNG")
        with open(args.replot) as f:
            run = json.load(f)
        plot(run["rows"], f"{run['meta']['device']}, {run['meta']['timing']}", args.plot)
        return
    timing.CUDA_GRAPHS = args.cuda_graphs

    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        settings = PixelflyAttentionConfig(block_size=16, n_factors=2, n_global_tokens=8, min_seq_len_for_sparse=64)
        seq_lens, head_dims, tokens, heads = [64, 128], [16], 256, 2
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU; use --dry-run on CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        settings = PixelflyAttentionConfig()
        seq_lens, head_dims, tokens, heads = args.seq_lens, args.head_dims, args.tokens, args.heads
    forced = PixelflyAttentionConfig(**{**settings.to_dict(), "min_seq_len_for_sparse": 0, "max_density_for_sparse": 1.0})
    bench = lambda fn: timing.median_ms(fn, [()])  # noqa: E731  (one input set: q, k, v live in the closure)
    start = time.time()
    rows = []
    for causal in (True, False):
        for d in head_dims:
            for s in seq_lens:
                b = max(1, tokens // s)
                gen = torch.Generator(device=device).manual_seed(0)
                q, k, v = (
                    torch.randn(b, heads, s, d, device=device, dtype=dtype, generator=gen).requires_grad_(True)
                    for _ in range(3)
                )
                row = dict(causal=causal, head_dim=d, seq_len=s, batch=b, heads=heads,
                           density=round(block_density(s, pattern_of(settings), causal), 4),
                           choice=choose_attention(s, settings, causal))
                row["sdpa_ms"] = bench(_fwd_bwd(_sdpa, q, k, v, causal))
                if time.time() - start > args.budget_s:
                    row["pixelfly_ms"] = row["flex_ms"] = None
                    row["note"] = "sparse path skipped: time budget"
                else:
                    sparse = _pixelfly(_Module(causal, forced))
                    row["pixelfly_ms"] = bench(_fwd_bwd(sparse, q, k, v, causal))
                    # CPU FlexAttention has no backward
                    row["flex_ms"] = None if args.dry_run else bench(_fwd_bwd(_flex(forced), q, k, v, causal))
                    if s <= 1024:
                        with torch.no_grad():
                            keep = dense_pattern(s, s, pattern_of(forced), causal, device=device)
                            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
                            row["max_err_vs_masked_sdpa"] = (sparse(q, k, v, causal) - ref).abs().max().item()
                row["chosen_ms"] = row["sdpa_ms"] if row["choice"] == "sdpa" else row["pixelfly_ms"]
                for key in ("pixelfly", "flex", "chosen"):
                    t = row[f"{key}_ms"]
                    row[f"{key}_speedup"] = round(row["sdpa_ms"] / t, 3) if t else None
                rows.append(row)
                print(json.dumps(row), flush=True)
                del q, k, v

    header = f"{'causal':>6} {'d':>4} {'S':>6} {'B':>3} {'density':>7} {'sdpa ms':>8} {'pixfly ms':>9} {'speedup':>7} {'flex ms':>8} {'flex x':>6} {'chosen':>8} {'chosen x':>8}"
    print("\nPixelfly attention vs SDPA, fwd+bwd, " + ("CPU dry run" if args.dry_run else f"{torch.cuda.get_device_name()} bf16"))
    print(header)
    for r in rows:
        pix = f"{r['pixelfly_ms']:.3f}" if r["pixelfly_ms"] else "skipped"
        sp = f"{r['pixelfly_speedup']:.2f}" if r["pixelfly_speedup"] else "-"
        ch = f"{r['chosen_speedup']:.2f}" if r["chosen_speedup"] else "-"
        fx = f"{r['flex_ms']:>8.3f} {r['flex_speedup']:>6.2f}" if r["flex_ms"] else f"{'-':>8} {'-':>6}"
        print(f"{str(r['causal']):>6} {r['head_dim']:>4} {r['seq_len']:>6} {r['batch']:>3} {r['density']:>7.3f} "
              f"{r['sdpa_ms']:>8.3f} {pix:>9} {sp:>7} {fx} {r['choice']:>8} {ch:>8}")
    print(f"total {time.time() - start:.0f} s")
    meta = dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                dtype=str(dtype), settings=settings.to_dict(), timing=("median of CUDA graph replays" if args.cuda_graphs else "median of triton.testing.do_bench")
                + ", fwd+bwd")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if args.plot:
        plot(rows, f"{meta['device']}, {meta['timing']}", args.plot)


if __name__ == "__main__":
    main()
