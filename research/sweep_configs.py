"""Question: is a slow butterfly product slow under every config, or did the autotuner pick badly, or does the
same config time differently from run to run? Every autotuner config of one product, timed explicitly.

    python research/sweep_configs.py --shape 1024x4096 --layout 16x2 --product fwd --repeat 2 --json out.json
    TRITON_INTERPRET=1 python research/sweep_configs.py --dry-run      # CPU: checks the script, not speed

For each config that the autotuner's own pruning keeps for this product, the median ms over rotated inputs, measured
`--repeat` times in one process (rounds interleaved, so a drift in clocks shows as spread, not as a config's
speed), then the autotuner's pick through the normal launch path.
"""
import argparse
import dataclasses
import json

import torch
import triton

from pixelfly_hf.timing import median_ms
from pixelfly_kernels import butterfly_launch as kernels
from pixelfly_kernels.butterfly_configs import DW_CONFIGS, DW_SPLIT_CONFIGS, MM_CONFIGS, prune_dw, prune_matmul

PRODUCTS = ("fwd", "dx", "dw")


def candidates(product, tokens, q, p, x, g, w):
    """The configs the autotuner would try for this product (its pruning, on these tensors' alignment)."""
    # dW: the direct kernel's configs and the token-split kernel's. A one-share config is timed as the direct kernel
    # runs it (plain store); the split kernel runs it with atomic fp32 adds, a memset and a cast
    if product == "dw":
        named = dict(M=tokens, Q=q, P=p, F=w.shape[1], TMA_ALIGNED=kernels._tma_aligned(g, x))
        return list(dict.fromkeys(prune_dw(DW_CONFIGS + DW_SPLIT_CONFIGS, named)))
    n_patch, k_patch = (q, p) if product == "fwd" else (p, q)
    a = x if product == "fwd" else g
    out = torch.empty(tokens, w.shape[0] * n_patch, device=a.device, dtype=a.dtype)
    named = dict(M=tokens, N_PATCH=n_patch, K_PATCH=k_patch, TMA_ALIGNED=kernels._tma_aligned(a, w.view(-1, p), out))
    return prune_matmul(MM_CONFIGS, named)


def launcher(product, w, n_slots, butterfly_size):
    if product == "fwd":
        return lambda x, g, config: kernels.butterfly_matmul(x, w, config=config)
    if product == "dx":
        return lambda x, g, config: kernels.butterfly_matmul_t(g, w, config=config)
    return lambda x, g, config: kernels.butterfly_matmul_dw(g, x, n_slots, butterfly_size, config=config)


def sweep(tokens, in_f, out_f, bs, k, product, repeat, max_configs, device, dtype):
    q, p = out_f // bs, in_f // bs
    xs = [torch.randn(tokens, in_f, device=device, dtype=dtype) for _ in range(3)]
    gs = [torch.randn(tokens, out_f, device=device, dtype=dtype) for _ in range(3)]
    w = torch.randn(bs, k + 1, q, p, device=device, dtype=dtype) / (p * (k + 1)) ** 0.5
    run = launcher(product, w, k + 1, bs)
    configs = candidates(product, tokens, q, p, xs[0], gs[0], w)[:max_configs]
    times = {c: [] for c in configs}
    errors = {}
    for _ in range(repeat):
        for config in configs:
            if config in errors:
                continue
            try:
                times[config].append(median_ms(lambda x, g: run(x, g, config), list(zip(xs, gs))))
            except Exception as err:  # e.g. out of shared memory on this GPU: report it, keep sweeping
                errors[config] = f"{type(err).__name__}: {err}"[:160]
    rows = [{"config": list(dataclasses.astuple(c)), "ms": times[c], "error": errors.get(c)} for c in configs]
    rows.sort(key=lambda r: min(r["ms"]) if r["ms"] else float("inf"))
    picked_ms = median_ms(lambda x, g: run(x, g, None), list(zip(xs, gs)))
    tuned = (kernels._butterfly_dw_tuned, kernels._butterfly_dw_split_tuned) if product == "dw" else (kernels._butterfly_mm_tuned,)
    picks = {str(key): str(config) for t in tuned for key, config in t.cache.items()}
    return rows, {"ms": picked_ms, "configs": picks}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--shape", default="1024x4096", help="in x out")
    parser.add_argument("--layout", default="16x2", help="butterfly_size x n_factors")
    parser.add_argument("--product", choices=PRODUCTS, default="fwd")
    parser.add_argument("--repeat", type=int, default=2, help="rounds over all configs (run-to-run spread)")
    parser.add_argument("--max-configs", type=int, default=1000)
    parser.add_argument("--json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, fp32, tiny shape, three configs (TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.dry_run:
        if not kernels.INTERPRET:
            parser.error("--dry-run runs the Triton kernels on CPU: set TRITON_INTERPRET=1")
        device, dtype, tokens, max_configs = torch.device("cpu"), torch.float32, 64, 3
        args.shape, args.layout = "256x256", "2x1"  # 128-wide patches: several configs survive the pruning
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; use --dry-run on CPU")
    else:
        device, dtype, tokens, max_configs = torch.device("cuda"), torch.bfloat16, args.tokens, args.max_configs
    in_f, out_f = map(int, args.shape.split("x"))
    bs, k = map(int, args.layout.split("x"))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    print(f"{name}  torch {torch.__version__}  triton {triton.__version__}  {args.product} {in_f}->{out_f} "
          f"bs={bs} k={k} tokens={tokens}", flush=True)
    rows, picked = sweep(tokens, in_f, out_f, bs, k, args.product, args.repeat, max_configs, device, dtype)
    flags = "all_slots, split_k, full_patch_n" if args.product == "dw" else "persistent, tma_store, group_m, flat_k, full_patch_n"
    print(f"{f'config (bm, bn, bk, warps, stages, tma, {flags})':<72} ms per round")
    for r in rows:
        print(f"{str(tuple(r['config'])):<72} " + (r["error"] or "  ".join(f"{t:.4f}" for t in r["ms"])))
    print(f"autotuner's pick: {picked['ms']:.4f} ms  ({'; '.join(picked['configs'].values())})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "triton": triton.__version__, "product": args.product,
                       "shape": f"{in_f}->{out_f}", "layout": f"bs={bs} k={k}", "tokens": tokens, "rows": rows,
                       "autotuner": picked}, f, indent=1)


if __name__ == "__main__":
    main()
