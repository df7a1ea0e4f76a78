"""Question: do the butterfly kernels match an fp32 reference on a CUDA GPU, for every config the autotuner may pick?

Answer on an H200: yes, worst relative error 1.86e-3 over 247 configs (docs/dev/benchmarks-log.md).
It is a bf16 correctness grid on CUDA, then a first timing table.

    python research/check_gpu.py [--json PATH]
    python research/check_gpu.py --every-config [--json PATH]

Correctness: forward, dX and dW of the Triton kernels (autotuned) and a PixelflyLinear (sparse + low rank,
with and without gate) in bf16 against an fp32 reference on fresh random inputs, outputs poisoned with NaN
first; passes at relative Frobenius error <= 1e-2. Timing: GPT-2 small/medium MLP shapes, 16384 tokens, bf16,
forward and forward+backward of PixelflyLinear against nn.Linear (cuBLAS), medians of triton's do_bench.

--every-config checks instead every config the autotuner may pick for a few shapes (power-of-2 and 48-, 96-, 160-,
192-wide patches, the token-split dW), each run explicitly: the autotuner keeps the fastest config without looking
at its result, so a config that compiles wrongly on the GPU would otherwise only show where it happens to win.
"""
import argparse
import dataclasses
import functools
import json
import sys

import torch
import triton
from torch import nn

from pixelfly_hf import PixelflyLinear
from pixelfly_hf.timing import median_ms
from pixelfly_kernels import butterfly_launch as kernels
from pixelfly_kernels.butterfly_configs import DW_CONFIGS, DW_SPLIT_CONFIGS, MM_CONFIGS, prune_dw, prune_matmul
from pixelfly_kernels.reference import butterfly_to_dense

# (tokens, in, out, butterfly_size, n_factors): odd token counts, non-square and non-power-of-2 tiles
GRID = [
    (37, 64, 128, 4, 2), (50, 128, 64, 4, 1), (19, 96, 48, 2, 1), (1000, 768, 3072, 16, 2),
    (777, 3072, 768, 16, 2), (4096, 1024, 4096, 16, 2), (2048, 4096, 1024, 8, 2), (513, 1280, 5120, 32, 2),
]


def rel_err(got, want):
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def random_case(tokens, in_f, out_f, bs, k, dtype, device):
    """Weight, input, output gradient, bias, and the dense 0/1 mask of the layout."""
    q, p = out_f // bs, in_f // bs
    w = torch.randn(bs, k + 1, q, p, device=device, dtype=dtype) / p**0.5
    x = torch.randn(tokens, in_f, device=device, dtype=dtype)
    g = torch.randn(tokens, out_f, device=device, dtype=dtype)
    b = torch.randn(out_f, device=device, dtype=dtype)
    return w, x, g, b, butterfly_to_dense(torch.ones_like(w, dtype=torch.float32))


def check_kernels(dtype=torch.bfloat16, device="cuda", grid=GRID):
    """Relative error per product and shape (device/grid other than the defaults: the CPU test of this script)."""
    rows = []
    for tokens, in_f, out_f, bs, k in grid:
        w, x, g, b, mask = random_case(tokens, in_f, out_f, bs, k, dtype, device)
        dense = butterfly_to_dense(w.float())
        y = kernels.butterfly_matmul(x, w, b, out=torch.full((tokens, out_f), float("nan"), device=device, dtype=dtype))
        dx = kernels.butterfly_matmul_t(g, w, out=torch.full_like(x, float("nan")))
        dw = kernels.butterfly_matmul_dw(g, x, k + 1, bs, out=torch.full_like(w, float("nan")))
        errs = {
            "fwd": rel_err(y, x.float() @ dense.T + b.float()),
            "dX": rel_err(dx, g.float() @ dense),
            "dW": rel_err(butterfly_to_dense(dw.float()), (g.float().T @ x.float()) * mask),
        }
        rows.append({"shape": f"{tokens}x{in_f}->{out_f} bs={bs} k={k}", **errs})
    return rows


# (tokens, in, out, butterfly_size, n_factors[, misaligned]) for --every-config: patches 640x160, 192x48, 256x64 (4096
# tokens: the token-split dW configs keep >= 1024 tokens per share), 24x96; and 160x80 with X and dY starting 2 bytes
# past 16-byte alignment (no TMA: a dW config that is correct on aligned inputs can make an illegal memory access there)
EVERY_CONFIG_SHAPES = [(1000, 1280, 5120, 8, 2), (777, 768, 3072, 16, 2), (4096, 1024, 4096, 16, 2), (513, 3072, 768, 32, 2),
                       (517, 640, 1280, 8, 2, "misaligned")]


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of t whose base address is one element past a 16-byte aligned one."""
    buffer = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    return buffer[1:].view(t.shape).copy_(t)


def check_every_config(dtype=torch.bfloat16, device="cuda", shapes=EVERY_CONFIG_SHAPES, rank=32):
    """Relative error of every config the autotuner would try, per shape and product (forward and dX with bias and
    the rank-`rank` segment); outputs poisoned with NaN first."""
    rows = []
    for tokens, in_f, out_f, bs, k, *misaligned in shapes:
        q, p = out_f // bs, in_f // bs
        w, x, g, b, mask = random_case(tokens, in_f, out_f, bs, k, dtype, device)
        if misaligned:
            x, g = _misaligned(x), _misaligned(g)
        label = f"{tokens}x{in_f}->{out_f} bs={bs} k={k}" + (" misaligned" if misaligned else "")
        u = torch.randn(out_f, rank, device=device, dtype=dtype) / rank**0.5
        v = torch.randn(rank, in_f, device=device, dtype=dtype) / in_f**0.5
        full = butterfly_to_dense(w.float()) + u.float() @ v.float()
        want = {"fwd": x.float() @ full.T + b.float(), "dX": g.float() @ full, "dW": (g.float().T @ x.float()) * mask}
        aligned = kernels._tma_aligned(x, g, w.view(-1, p))
        products = [("fwd", dict(N_PATCH=q, K_PATCH=p)), ("dX", dict(N_PATCH=p, K_PATCH=q))]
        for product, sizes in products:
            named = dict(M=tokens, TMA_ALIGNED=aligned, **sizes)
            for config in prune_matmul(MM_CONFIGS, named):
                if product == "fwd":
                    run = functools.partial(kernels.butterfly_matmul, x, w, b, x @ v.T, u, config=config,
                                            out=torch.full((tokens, out_f), float("nan"), device=device, dtype=dtype))
                else:
                    run = functools.partial(kernels.butterfly_matmul_t, g, w, g @ u, v, config=config,
                                            out=torch.full_like(x, float("nan")))
                rows.append({"shape": label, "product": product, "config": dataclasses.astuple(config),
                             **_error_or_skip(run, lambda got: rel_err(got, want[product]))})
        named = dict(M=tokens, Q=q, P=p, F=k + 1, TMA_ALIGNED=aligned)
        # the split kernel's one-share configs are direct configs (explicit configs run them without the atomic
        # store; the split ones below exercise it)
        split = [c for c in DW_SPLIT_CONFIGS if c.split_k > 1]
        for config in prune_dw(DW_CONFIGS + split, named):
            run = functools.partial(kernels.butterfly_matmul_dw, g, x, k + 1, bs, out=torch.full_like(w, float("nan")),
                                    config=config)
            rows.append({"shape": label, "product": "dW", "config": dataclasses.astuple(config),
                         **_error_or_skip(run, lambda got: rel_err(butterfly_to_dense(got.float()), want["dW"]))})
        mine = [r for r in rows if r["shape"] == rows[-1]["shape"]]
        ran = [r["err"] for r in mine if "skipped" not in r]
        print(f"  {rows[-1]['shape']}: {len(ran)} configs, worst error {max(ran):.2e}; {len(mine) - len(ran)} skipped "
              "(more shared memory than the GPU has)", flush=True)
    return rows


def _error_or_skip(run, error) -> dict:
    """{"err": error(run())}, or {"skipped": why} for a config that needs more shared memory than the GPU has: the
    autotuner skips those the same way (their shared memory is known only once compiled)."""
    try:
        return {"err": error(run())}
    except triton.runtime.errors.OutOfResources as e:
        return {"skipped": str(e)}


def check_layer(dtype=torch.bfloat16):
    """PixelflyLinear fwd + all grads: Triton in bf16 and the PyTorch reference in bf16, both against fp32.

    A tensor passes at <= 1e-2, or, where bf16 itself cannot reach that (the gate bias's gradient sums
    cancelling per-token terms), when Triton is no worse than 1.5x the reference path in the same bf16.
    """
    rows = []
    for gate in (False, True):
        torch.manual_seed(0)
        layer = PixelflyLinear(768, 3072, butterfly_size=16, n_factors=2, rank=32, gate=gate, device="cuda")
        with torch.no_grad():
            layer.lowrank_u.normal_(0, 0.02)
            if gate:
                layer.gate.weight.normal_(0, 0.05)
        x = torch.randn(8, 123, 768, device="cuda")
        grad = torch.randn(8, 123, 3072, device="cuda")
        outs = {}
        for run, backend, dt in (("triton", "triton", dtype), ("bf16 reference", "reference", dtype),
                                 ("fp32", "reference", torch.float32)):
            layer.backend = backend
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            with torch.autocast("cuda", dtype=dt, enabled=dt != torch.float32):
                y = layer(xi)
            y.backward(grad)
            outs[run] = [y, xi.grad] + [p.grad.clone() for p in layer.parameters()]
        names = ["y", "dx"] + [n for n, _ in layer.named_parameters()]
        for name, tri, ref16, ref32 in zip(names, outs["triton"], outs["bf16 reference"], outs["fp32"]):
            err, floor = rel_err(tri, ref32), rel_err(ref16, ref32)
            rows.append({"gate": gate, "tensor": name, "triton": err, "bf16_reference": floor,
                         "ok": err <= 1e-2 or err <= 1.5 * floor})
    return rows


def time_mlp_shapes(tokens=16384, dtype=torch.bfloat16):
    rows = []
    shapes = [("gpt2-small fc1", 768, 3072), ("gpt2-small fc2", 3072, 768),
              ("gpt2-medium fc1", 1024, 4096), ("gpt2-medium fc2", 4096, 1024)]
    for name, in_f, out_f in shapes:
        xs = [torch.randn(tokens, in_f, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
        gs = [torch.randn(tokens, out_f, device="cuda", dtype=dtype) for _ in range(3)]
        layers = {
            "dense": nn.Linear(in_f, out_f, device="cuda", dtype=dtype),
            "pixelfly r=0": PixelflyLinear(in_f, out_f, butterfly_size=16, n_factors=2, rank=0, device="cuda", dtype=dtype),
            "pixelfly r=32": PixelflyLinear(in_f, out_f, butterfly_size=16, n_factors=2, rank=32, device="cuda", dtype=dtype),
        }
        times = {}
        for label, layer in layers.items():
            fwd = median_ms(lambda x, g: layer(x), list(zip(xs, gs)), warmup=50, rep=200)
            fwd_bwd = median_ms(lambda x, g: layer(x).backward(g), list(zip(xs, gs)), warmup=50, rep=200)
            times[label] = (fwd, fwd_bwd)
        d = times["dense"]
        for label, (fwd, fb) in times.items():
            rows.append({"matrix": name, "shape": f"{in_f}->{out_f}", "layer": label, "fwd_ms": fwd, "fwd_bwd_ms": fb,
                         "fwd_speedup": d[0] / fwd, "fwd_bwd_speedup": d[1] / fb})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--every-config", action="store_true",
                        help="only the correctness of every config the autotuner may pick, on a few shapes")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    torch.manual_seed(0)
    if args.every_config:
        rows = check_every_config()
        ran = [r for r in rows if "skipped" not in r]
        failed = [r for r in ran if not r["err"] <= 1e-2]
        for r in failed:
            print(f"  FAIL {r['shape']} {r['product']} config {r['config']}: relative error {r['err']:.2e}")
        print(f"every config: {len(ran)} runs over {len(EVERY_CONFIG_SHAPES)} shapes ({len(rows) - len(ran)} skipped), "
              f"worst error {max(r['err'] for r in ran):.2e} (limit 1e-2) => {'FAIL' if failed else 'PASS'}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                           "every_config": rows, "pass": not failed}, f, indent=1)
        sys.exit(1 if failed else 0)
    kernel_rows, layer_rows = check_kernels(), check_layer()
    print("\nbf16 kernels, relative error vs fp32 reference (limit 1e-2)")
    for r in kernel_rows:
        print(f"  {r['shape']:<34} fwd {r['fwd']:.2e}  dX {r['dX']:.2e}  dW {r['dW']:.2e}")
    print("PixelflyLinear(768->3072, bs=16, k=2, r=32) under bf16 autocast, relative error vs fp32")
    for r in layer_rows:
        print(f"  gate={r['gate']!s:<5} {r['tensor']:<12} triton {r['triton']:.2e}   reference in bf16 {r['bf16_reference']:.2e}"
              f"   {'ok' if r['ok'] else 'FAIL'}")
    ok = all(max(r["fwd"], r["dX"], r["dW"]) <= 1e-2 for r in kernel_rows) and all(r["ok"] for r in layer_rows)
    print(f"  => {'PASS' if ok else 'FAIL'}", flush=True)
    timing = time_mlp_shapes()
    print("\n16384 tokens, bf16, PixelflyLinear bs=16 k=2 (18.75% sparse) vs nn.Linear")
    print(f"  {'matrix':<16} {'layer':<14} {'fwd ms':>8} {'x dense':>8} {'fwd+bwd ms':>11} {'x dense':>8}")
    for r in timing:
        print(f"  {r['matrix']:<16} {r['layer']:<14} {r['fwd_ms']:8.3f} {r['fwd_speedup']:8.2f} {r['fwd_bwd_ms']:11.3f} {r['fwd_bwd_speedup']:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "kernels": kernel_rows, "layer": layer_rows, "timing": timing, "pass": ok}, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
