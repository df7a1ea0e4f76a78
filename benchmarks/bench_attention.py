"""Pixelfly attention vs dense SDPA, forward + backward, bf16 (H200).

    python benchmarks/bench_attention.py --json $OUT/attn.json        # GPU, ~3-4 min (mostly compiles)
    python benchmarks/bench_attention.py --dry-run                    # CPU smoke test, tiny shapes

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

from pixelfly_hf.attention import AttentionSettings, choose_attention, pixelfly_attention_forward
from pixelfly_kernels.butterfly_attention import block_density, dense_pattern, flex_pixelfly_attention
import timing  # benchmarks/timing.py


class _Module(torch.nn.Module):
    def __init__(self, causal: bool, settings: AttentionSettings):
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
        return flex_pixelfly_attention(q, k, v, settings.pattern(), causal, q.shape[-1] ** -0.5)

    return run


def _fwd_bwd(attn, q, k, v, causal):
    grad = torch.randn_like(q)

    def step():
        for t in (q, k, v):
            t.grad = None
        attn(q, k, v, causal).backward(grad)

    return step


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
    args = parser.parse_args(argv)
    timing.CUDA_GRAPHS = args.cuda_graphs

    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        settings = AttentionSettings(block_size=16, n_factors=2, low_rank=8, min_seq_len_for_sparse=64)
        seq_lens, head_dims, tokens, heads = [64, 128], [16], 256, 2
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU; use --dry-run on CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        settings = AttentionSettings()
        seq_lens, head_dims, tokens, heads = args.seq_lens, args.head_dims, args.tokens, args.heads
    forced = AttentionSettings(**{**settings.to_dict(), "min_seq_len_for_sparse": 0, "max_density_for_sparse": 1.0})
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
                           density=round(block_density(s, settings.pattern(), causal), 4),
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
                            keep = dense_pattern(s, s, forced.pattern(), causal, device=device)
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
    if args.json:
        meta = dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                    device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    dtype=str(dtype), settings=settings.to_dict(), timing=("median of CUDA graph replays" if args.cuda_graphs else "median of triton.testing.do_bench")
                    + ", fwd+bwd")
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
