"""Pixelfly linear layer on the GPU: forward, dX, dW against dense cuBLAS, torch BSR and a Monarch-style layer.

    python benchmarks/bench_linear.py [--tokens 16384] [--json PATH] [--plot PATH] [--quick] [--cuda-graphs] [--gpus N]
    TRITON_INTERPRET=1 python benchmarks/bench_linear.py --dry-run      # CPU smoke test: tiny shapes, fp32

--gpus N runs the shapes in N processes, one per GPU of the host, and merges their tables (the full table takes ≈ 15
minutes on one GPU, longer than a device call may run).

For each shape and flat butterfly layout (densities 9.4%, 18.75%, 25%, 37.5%): medians of triton's do_bench
over rotating input sets (the L2 never holds them), bf16; with --cuda-graphs, medians of the same calls replayed
from a CUDA graph (GPU time only: short kernels launched one by one from Python can leave the GPU idle).
TFLOP/s count the nonzero FLOPs (2 * tokens * stored weights per product); "% dense" compares that rate with
cuBLAS's on the dense matrix; "speedup" is dense time / our time. "pixelfly kernels + r=32" adds the rank-32
low-rank term the way the layer's op computes it (Z = X Vᵀ and dZ = dY U as cuBLAS GEMMs, U and V fused into the
sparse kernels as an extra K segment, dU = dYᵀ Z and dV = dZᵀ X as cuBLAS GEMMs after the dW kernel), so its ratio
to the row above is what the low-rank term costs. "cuBLAS bmm, pre-gathered (ceiling)" runs the same nonzero FLOPs
as cuBLAS batched GEMMs on input patches gathered before timing: the rate cuBLAS itself gets at this K, i.e. what
"% dense" can reach on this structure. "% roofline" = our time / the floor, where each product's floor is the
larger of its nonzero FLOPs at cuBLAS's rate for that product on the dense matrix and its compulsory bytes (X and Y
once, the stored weights once) at the copy bandwidth measured in the same run. Autotuning happens on the first
call of each kernel and is timed separately (Triton caches the result on disk, so a second run skips it).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from pixelfly_hf import PixelflyLinear
from pixelfly_hf import timing
from pixelfly_hf.timing import median_ms
from pixelfly_kernels import butterfly_launch as kernels
from pixelfly_kernels.reference import butterfly_to_dense

SHAPES = [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024), (1280, 5120), (4096, 4096)]
LAYOUTS = [(32, 2), (16, 2), (16, 3), (8, 2)]  # (butterfly_size, n_factors): 9.4%, 18.75%, 25%, 37.5%


def monarch_factors(in_f, out_f, density, device, dtype):
    """Two block-diagonal factors (Monarch, fly's MonarchLinear shape) with about `density` of the dense params."""
    best = None
    for nblocks in (2, 4, 8, 16, 32, 64):
        if in_f % nblocks or out_f % nblocks or (in_f // nblocks) % nblocks:
            continue
        params = in_f * in_f // nblocks + in_f * out_f // nblocks
        gap = abs(params / (in_f * out_f) - density)
        if best is None or gap < best[0]:
            best = (gap, nblocks)
    n = best[1]
    a = in_f // n
    w1 = torch.randn(n, a, a, device=device, dtype=dtype, requires_grad=True)
    w2 = torch.randn(n, a, out_f // n, device=device, dtype=dtype, requires_grad=True)
    return n, w1, w2


def monarch_forward(x, n, w1, w2):
    tokens = x.shape[0]
    a = w1.shape[1]
    h = torch.bmm(x.view(tokens, n, a).transpose(0, 1), w1)  # (n, T, a): block-diagonal factor 1
    # the Monarch permutation: block i's chunk j goes to block j's chunk i
    h = h.view(n, tokens, n, a // n).permute(2, 1, 0, 3).reshape(n, tokens, a)
    y = torch.bmm(h, w2)  # (n, T, out/n): block-diagonal factor 2
    return y.transpose(0, 1).reshape(tokens, -1)


def bsr_forward_fn(dense_masked, tile_q, tile_p):
    from torch.sparse._triton_ops import bsr_dense_mm

    block = max(b for b in (16, 32, 64, 128) if tile_q % b == 0 and tile_p % b == 0)
    with warnings.catch_warnings():  # "Sparse BSR tensor support is in beta state": known, it is the peer measured
        warnings.simplefilter("ignore", UserWarning)
        bsr = dense_masked.to_sparse_bsr((block, block))
    return block, lambda x: bsr_dense_mm(bsr, x.T)


def copy_bandwidth_gbs(device, numel=2**29):
    """Copy rate (read + write bytes per second) on 1 GiB: the byte ceiling."""
    src = torch.empty(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), [()])
    return 2 * src.numel() * src.element_size() / ms / 1e6


def lowrank_kernels(w, u, v):
    """fwd, dX and dW of sparse + low rank with the bare kernels, as the layer's op does them (kernels/ops.py).
    Each product takes (x, dY, Z, dZ): dZ = dY U is computed once per backward, timed in dX, reused by dV;
    Z comes saved from the forward."""
    n_slots, butterfly_size = w.shape[1], w.shape[0]

    def fwd(x, g, z, dz):
        return kernels.butterfly_matmul(x, w, None, x @ v.T, u)

    def dx(x, g, z, dz):
        return kernels.butterfly_matmul_t(g, w, g @ u, v)

    def dw(x, g, z, dz):
        kernels.butterfly_matmul_dw(g, x, n_slots, butterfly_size)
        return g.T @ z, dz.T @ x  # dU (Z saved by the forward, as the op does), dV

    return fwd, dx, dw


def lowrank_breakdown(tokens, shapes, layouts, device, dtype, rank=32):
    """Each piece of the rank-`rank` term timed alone (what the "+ r=32" row's overhead is made of), with the
    sparse kernels alone for scale. The skinny GEMMs each read one (tokens x features) matrix once: their floor
    is that read at the copy bandwidth."""
    rows = []
    bandwidth = copy_bandwidth_gbs(device, 2**29 if device.type == "cuda" else 2**20)
    for in_f, out_f in shapes:
        xs = [torch.randn(tokens, in_f, device=device, dtype=dtype) for _ in range(3)]
        gs = [torch.randn(tokens, out_f, device=device, dtype=dtype) for _ in range(3)]
        u = torch.randn(out_f, rank, device=device, dtype=dtype) / rank**0.5
        v = torch.randn(rank, in_f, device=device, dtype=dtype) / in_f**0.5
        for bs, k in layouts:
            w = torch.randn(bs, k + 1, out_f // bs, in_f // bs, device=device, dtype=dtype) / (in_f // bs * (k + 1)) ** 0.5
            inputs = [(x, g, x @ v.T, g @ u) for x, g in zip(xs, gs)]
            pieces = {
                "sparse fwd": lambda x, g, z, dz: kernels.butterfly_matmul(x, w),
                "sparse dX": lambda x, g, z, dz: kernels.butterfly_matmul_t(g, w),
                "sparse dW": lambda x, g, z, dz: kernels.butterfly_matmul_dw(g, x, k + 1, bs),
                "Z = X Vt": lambda x, g, z, dz: x @ v.T,
                "fwd + Z Ut segment": lambda x, g, z, dz: kernels.butterfly_matmul(x, w, None, z, u),
                "dZ = dY U": lambda x, g, z, dz: g @ u,
                "dX + dZ V segment": lambda x, g, z, dz: kernels.butterfly_matmul_t(g, w, dz, v),
                "dU = dYt Z": lambda x, g, z, dz: g.T @ z,
                "dV = dZt X": lambda x, g, z, dz: dz.T @ x,
            }
            floor_x = tokens * in_f * xs[0].element_size() / bandwidth / 1e6  # bandwidth counts read + write bytes
            floor_g = tokens * out_f * gs[0].element_size() / bandwidth / 1e6
            times = {name: median_ms(fn, inputs) for name, fn in pieces.items()}
            rows.append({"shape": f"{in_f}->{out_f}", "layout": f"bs={bs} k={k}", "rank": rank, "ms": times,
                         "read_floor_ms": {"X": floor_x, "dY": floor_g}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def gathered_bmm(w, xs, gs):
    """The same products as cuBLAS batched GEMMs on patches gathered beforehand (gather not timed): same nonzero
    FLOPs and K as our kernels, so its rate is what a cuBLAS-class kernel reaches on this structure -- the
    ceiling for "% of dense". Returns (inputs per rotation, (fwd, dX, dW)); outputs come patch-major (B, T, .)."""
    B, F_, q, p = w.shape
    tokens = xs[0].shape[0]
    rows = torch.arange(B, device=w.device)
    partners = torch.stack([rows ^ ((1 << j) >> 1) for j in range(F_)], 1)  # (B, F): input patch of slot j
    cols_in = (partners[:, :, None] * p + torch.arange(p, device=w.device)).reshape(B, F_ * p)
    cols_out = (partners[:, :, None] * q + torch.arange(q, device=w.device)).reshape(B, F_ * q)
    w_fwd = w.transpose(2, 3).reshape(B, F_ * p, q)  # [r] = weight[r, j]^T stacked over j
    w_dx = w[partners, torch.arange(F_, device=w.device)].reshape(B, F_ * q, p)  # [c] = weight[c ^ o_j, j] over j
    inputs = [(x[:, cols_in].transpose(0, 1).contiguous(), g[:, cols_out].transpose(0, 1).contiguous(),
               g.view(tokens, B, q).permute(1, 2, 0).contiguous()) for x, g in zip(xs, gs)]
    return inputs, (lambda xg, gg, gt: torch.bmm(xg, w_fwd), lambda xg, gg, gt: torch.bmm(gg, w_dx),
                    lambda xg, gg, gt: torch.bmm(gt, xg))


def roofline_ms(tokens, in_f, out_f, density, dense_ms, bandwidth_gbs, elem=2):
    """Sum over fwd, dX, dW of max(FLOP floor at cuBLAS's per-product rate, compulsory-byte floor)."""
    nnz = density * in_f * out_f
    bytes_per_product = elem * (tokens * (in_f + out_f) + nnz)
    return sum(max(density * t, bytes_per_product / bandwidth_gbs / 1e6) for t in dense_ms)


def run(tokens, shapes, layouts, device, dtype, rank=32, on_shape=lambda rows, tuning, bandwidth: None, layers=True):
    """Measure every (shape, layout); after each shape, on_shape(rows so far, tuning so far, bandwidth) reports them,
    so a run cut short by a time limit keeps what it measured. layers=False: the bare products only (dense, ours,
    gathered cuBLAS, ours + low rank), without the autograd layers (PixelflyLinear, Monarch) and torch BSR."""
    rows, tuning = [], []
    bandwidth = copy_bandwidth_gbs(device, 2**29 if device.type == "cuda" else 2**20)
    print(f"copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for in_f, out_f in shapes:
        xs = [torch.randn(tokens, in_f, device=device, dtype=dtype) for _ in range(3)]
        gs = [torch.randn(tokens, out_f, device=device, dtype=dtype) for _ in range(3)]
        w_dense = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f**0.5
        dense_flops = 2 * tokens * in_f * out_f
        d_fwd = median_ms(lambda x, g: F.linear(x, w_dense), list(zip(xs, gs)))
        d_dx = median_ms(lambda x, g: g @ w_dense, list(zip(xs, gs)))
        d_dw = median_ms(lambda x, g: g.T @ x, list(zip(xs, gs)))
        d_total = d_fwd + d_dx + d_dw
        dense_tflops = 3 * dense_flops / d_total / 1e9
        rows.append({"shape": f"{in_f}->{out_f}", "impl": "dense cuBLAS", "density": 1.0, "fwd_ms": d_fwd, "dx_ms": d_dx,
                     "dw_ms": d_dw, "total_ms": d_total, "tflops": dense_tflops, "pct_dense": 100.0, "speedup": 1.0})
        for bs, k in layouts:
            q, p = out_f // bs, in_f // bs
            density = (k + 1) / bs
            w = torch.randn(bs, k + 1, q, p, device=device, dtype=dtype) / (p * (k + 1)) ** 0.5
            nz_flops = dense_flops * density
            t0 = time.perf_counter()
            kernels.butterfly_matmul(xs[0], w)
            kernels.butterfly_matmul_t(gs[0], w)
            kernels.butterfly_matmul_dw(gs[0], xs[0], k + 1, bs)
            sync()
            tuning.append({"shape": f"{in_f}->{out_f}", "layout": f"bs={bs} k={k}", "first_call_s": time.perf_counter() - t0})
            f = median_ms(lambda x, g: kernels.butterfly_matmul(x, w), list(zip(xs, gs)))
            dx = median_ms(lambda x, g: kernels.butterfly_matmul_t(g, w), list(zip(xs, gs)))
            dw = median_ms(lambda x, g: kernels.butterfly_matmul_dw(g, x, k + 1, bs), list(zip(xs, gs)))
            total = f + dx + dw
            tf = 3 * nz_flops / total / 1e9
            floor = roofline_ms(tokens, in_f, out_f, density, (d_fwd, d_dx, d_dw), bandwidth)
            base = {"shape": f"{in_f}->{out_f}", "density": density, "layout": f"bs={bs} k={k} tile {q}x{p}"}
            rows.append({**base, "impl": "pixelfly kernels", "fwd_ms": f, "dx_ms": dx, "dw_ms": dw, "total_ms": total,
                         "tflops": tf, "pct_dense": 100 * tf / dense_tflops, "speedup": d_total / total,
                         "floor_ms": floor, "pct_roofline": 100 * floor / total})
            bmm_inputs, bmm_products = gathered_bmm(w, xs, gs)
            y_bmm = bmm_products[0](*bmm_inputs[0]).transpose(0, 1).reshape(tokens, out_f)
            torch.testing.assert_close(y_bmm, kernels.butterfly_matmul(xs[0], w), rtol=2e-2, atol=2e-2)  # same products
            bmm_times = [median_ms(product, bmm_inputs) for product in bmm_products]
            del bmm_inputs
            rows.append({**base, "impl": "cuBLAS bmm, pre-gathered (ceiling)", "fwd_ms": bmm_times[0], "dx_ms": bmm_times[1],
                         "dw_ms": bmm_times[2], "total_ms": sum(bmm_times), "tflops": 3 * nz_flops / sum(bmm_times) / 1e9,
                         "pct_dense": 100 * 3 * nz_flops / sum(bmm_times) / 1e9 / dense_tflops,
                         "speedup": d_total / sum(bmm_times)})
            u = torch.randn(out_f, rank, device=device, dtype=dtype) / rank**0.5
            v = torch.randn(rank, in_f, device=device, dtype=dtype) / in_f**0.5
            lr_inputs = [(x, g, x @ v.T, g @ u) for x, g in zip(xs, gs)]
            lr_times = [median_ms(product, lr_inputs) for product in lowrank_kernels(w, u, v)]
            lr_total = sum(lr_times)
            lr_flops = 3 * (nz_flops + 2 * tokens * rank * (in_f + out_f))
            rows.append({**base, "impl": f"pixelfly kernels + r={rank}", "fwd_ms": lr_times[0], "dx_ms": lr_times[1],
                         "dw_ms": lr_times[2], "total_ms": lr_total, "tflops": lr_flops / lr_total / 1e9,
                         "pct_dense": 100 * lr_flops / lr_total / 1e9 / dense_tflops, "speedup": d_total / lr_total,
                         "lowrank_overhead_pct": 100 * (lr_total / total - 1)})
            if not layers:
                continue
            # the full layer through autograd, sparse only and with the rank-32 low-rank term
            for layer_rank in (0, rank):
                layer = PixelflyLinear(in_f, out_f, bias=False, butterfly_size=bs, n_factors=k, rank=layer_rank, block_size=16,
                                       device=device, dtype=dtype)
                xr = [x.detach().clone().requires_grad_() for x in xs]
                lf = median_ms(lambda x, g: layer(x), list(zip(xr, gs)))
                lt = median_ms(lambda x, g: layer(x).backward(g), list(zip(xr, gs)))
                flops = 2 * tokens * layer.num_params_structured * 3
                rows.append({**base, "impl": f"PixelflyLinear r={layer_rank}", "fwd_ms": lf, "total_ms": lt,
                             "tflops": flops / lt / 1e9, "pct_dense": 100 * flops / lt / 1e9 / dense_tflops,
                             "speedup": d_total / lt})
            # Monarch-style two-bmm layer of about the same parameter count
            n, w1, w2 = monarch_factors(in_f, out_f, density, device, dtype)
            xr = [x.detach().clone().requires_grad_() for x in xs]
            mf = median_ms(lambda x, g: monarch_forward(x, n, w1, w2), list(zip(xr, gs)))
            mt = median_ms(lambda x, g: monarch_forward(x, n, w1, w2).backward(g), list(zip(xr, gs)))
            m_params = w1.numel() + w2.numel()
            rows.append({**base, "impl": f"Monarch 2xbmm nblocks={n} ({m_params / (in_f * out_f):.1%})", "fwd_ms": mf,
                         "total_ms": mt, "tflops": 6 * tokens * m_params / mt / 1e9,
                         "pct_dense": 100 * 6 * tokens * m_params / mt / 1e9 / dense_tflops, "speedup": d_total / mt})
            # torch's BSR kernel, forward only (it has no weight gradient)
            try:
                block, bsr_fwd = bsr_forward_fn(butterfly_to_dense(w), q, p)
                bf = median_ms(lambda x, g: bsr_fwd(x), list(zip(xs, gs)))
                rows.append({**base, "impl": f"torch BSR {block}x{block} (fwd only)", "fwd_ms": bf,
                             "tflops": nz_flops / bf / 1e9, "pct_dense": 100 * (nz_flops / bf) / (dense_flops / d_fwd),
                             "speedup_fwd": d_fwd / bf})
            except Exception as err:  # report, don't hide: BSR refuses some block shapes
                rows.append({**base, "impl": "torch BSR", "error": f"{type(err).__name__}: {err}"[:120]})
        on_shape(rows, tuning, bandwidth)
    return rows, tuning, bandwidth


def chosen_configs():
    """The autotuner's pick per kernel and key (tile sizes, warps, stages, TMA or pointer loads)."""
    return {name: {str(key): str(config) for key, config in tuned.cache.items()}
            for name, tuned in (("mm", kernels._butterfly_mm_tuned), ("dw", kernels._butterfly_dw_tuned),
                                ("dw_split", kernels._butterfly_dw_split_tuned))}


def print_header():
    print(f"{'shape':<11} {'layout':<24} {'impl':<36} {'fwd':>7} {'dX':>7} {'dW':>7} {'total':>7} {'TF/s':>6} {'%dense':>6} "
          f"{'speedup':>7} {'floor':>7} {'%roofline':>9}", flush=True)


def print_rows(rows):
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<11} {r.get('layout', ''):<24} {r['impl']:<36} {r['error']}")
            continue
        cell = lambda key: f"{r[key]:7.3f}" if key in r else f"{'-':>7}"
        speed = r.get("speedup", r.get("speedup_fwd"))
        print(f"{r['shape']:<11} {r.get('layout', 'dense'):<24} {r['impl']:<36} {cell('fwd_ms')} {cell('dx_ms')} {cell('dw_ms')} "
              f"{cell('total_ms')} {r['tflops']:6.0f} {r['pct_dense']:6.1f} {speed:7.2f}" + (" (fwd)" if "speedup_fwd" in r else "")
              + (f" {r['floor_ms']:7.3f} {r['pct_roofline']:9.1f}" if "floor_ms" in r else ""), flush=True)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        pts = sorted((r["density"], r["speedup"]) for r in rows if r["shape"] == shape and r["impl"] == "pixelfly kernels")
        ax.plot([d * 100 for d, _ in pts], [s for _, s in pts], marker="o", label=shape)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("density of the sparse part (%)")
    ax.set_ylabel("fwd+dX+dW speedup over dense cuBLAS")
    ax.set_title("Pixelfly kernels, bf16, H200")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument("--quick", action="store_true", help="two shapes, two layouts")
    parser.add_argument("--shapes", nargs="+", help="subset, e.g. 4096x4096 1024x4096 (in x out)")
    parser.add_argument("--layouts", nargs="+", help="subset, e.g. 16x2 (butterfly_size x n_factors)")
    parser.add_argument("--lowrank-breakdown", action="store_true", help="time each piece of the r=32 term instead")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time calls replayed from a CUDA graph (GPU time alone, no Python launch in between); "
                             "the bare products only, without the eager layer, Monarch and BSR rows")
    parser.add_argument("--tune-only", action="store_true",
                        help="call every product once, untimed: compiles and autotunes, filling Triton's autotuner "
                             "cache on disk (TRITON_CACHE_DIR) for a later run that measures without tuning")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, fp32, tiny shapes, kernels in Triton's interpreter (set TRITON_INTERPRET=1)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="no timing: one table (and --json/--plot) from runs split over several GPU calls")
    parser.add_argument("--gpus", type=int, default=1,
                        help="split the shapes over this many GPUs of the host (one process each), then merge")
    args = parser.parse_args(argv)
    if args.gpus > 1 and (args.merge or args.lowrank_breakdown):
        parser.error("--gpus splits a table run; it does not combine with --merge or --lowrank-breakdown")
    timing.CUDA_GRAPHS, timing.TUNE_ONLY = args.cuda_graphs, args.tune_only
    if args.merge:
        merge(args.merge, args.json, args.plot)
        return
    if args.dry_run:
        if not kernels.INTERPRET:
            parser.error("--dry-run runs the Triton kernels on CPU: set TRITON_INTERPRET=1")
        device, dtype, tokens = torch.device("cpu"), torch.float32, 64
        shapes, layouts = [(64, 128), (128, 64)], [(4, 1)]
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; use --dry-run on CPU")
    else:
        device, dtype, tokens = torch.device("cuda"), torch.bfloat16, args.tokens
        shapes, layouts = (SHAPES[2:3] + SHAPES[5:], LAYOUTS[1:3]) if args.quick else (SHAPES, LAYOUTS)
    if args.shapes:
        shapes = [tuple(map(int, s.split("x"))) for s in args.shapes]
    if args.layouts:
        layouts = [tuple(map(int, s.split("x"))) for s in args.layouts]
    if args.gpus > 1:
        if not args.dry_run and args.gpus > torch.cuda.device_count():
            parser.error(f"--gpus {args.gpus}: this host has {torch.cuda.device_count()} GPUs")
        split_over_gpus(args, shapes)
        return
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    print(f"{name}  torch {torch.__version__}  triton {triton.__version__}  tokens {tokens}", flush=True)
    if args.lowrank_breakdown:
        rows = lowrank_breakdown(tokens, shapes, layouts, device, dtype)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": name, "torch": torch.__version__, "triton": triton.__version__, "tokens": tokens,
                           "lowrank_breakdown": rows}, f, indent=1)
        return
    printed = []

    def report(rows, tuning, bandwidth):
        # the table grows shape by shape and the JSON is rewritten each time: a run cut short keeps its rows
        if not printed:
            print_header()
        print_rows(rows[len(printed):])
        printed[:] = rows
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": name, "torch": torch.__version__, "triton": triton.__version__,
                           "tokens": tokens, "timing": "tune only (untimed)" if args.tune_only
                           else "cuda graph" if args.cuda_graphs else "do_bench",
                           "copy_bandwidth_gbs": bandwidth, "rows": rows, "tuning": tuning,
                           "chosen_configs": chosen_configs()}, f, indent=1)

    rows, tuning, _ = run(tokens, shapes, layouts, device, dtype, on_shape=report, layers=not args.cuda_graphs)
    print("first call (compile + autotune) per layout:", ", ".join(f"{t['shape']} {t['layout']}: {t['first_call_s']:.1f}s" for t in tuning))
    print_lowrank_overheads(rows)
    if args.plot:
        plot(rows, args.plot)


def split_over_gpus(args, shapes):
    """The shapes dealt round-robin to args.gpus processes, GPU i seeing only device i; each writes its JSON as it goes,
    then one merged table, JSON and plot. With --json the parts and logs stay beside it (PATH.gpuI.json/.log): a
    run cut short keeps its finished shapes, for --merge."""
    with tempfile.TemporaryDirectory() as tmp:
        stem = Path(args.json) if args.json else Path(tmp, "table")
        procs, parts = [], []
        for gpu in range(args.gpus):
            mine = [f"{i}x{o}" for i, o in shapes[gpu::args.gpus]]
            if not mine:
                continue
            part, log = stem.with_suffix(f".gpu{gpu}.json"), stem.with_suffix(f".gpu{gpu}.log")
            command = [sys.executable, __file__, "--tokens", str(args.tokens), "--shapes", *mine, "--json", str(part)]
            command += ["--layouts", *args.layouts] if args.layouts else []
            command += [flag for flag, on in (("--cuda-graphs", args.cuda_graphs), ("--tune-only", args.tune_only),
                                              ("--dry-run", args.dry_run)) if on]
            print(f"GPU {gpu}: {' '.join(mine)}", flush=True)
            procs.append((gpu, log, subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                                     env={**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)})))
            parts.append(part)
        for gpu, log, proc in procs:
            if proc.wait() != 0:
                print(f"GPU {gpu}'s process exited with {proc.returncode}; its log ends:\n{log.read_text()[-2000:]}", flush=True)
        merge([str(part) for part in parts if part.exists()], args.json, args.plot)


def print_lowrank_overheads(rows):
    print("low-rank term's cost over the sparse kernels (target <= 10%):",
          ", ".join(f"{r['shape']} {r['layout'].split(' tile')[0]}: {r['lowrank_overhead_pct']:+.0f}%"
                    for r in rows if "lowrank_overhead_pct" in r))


def merge(paths, json_path, plot_path):
    """Several runs' JSON (e.g. the shapes split over two GPU calls) as one table, JSON and plot."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    rows = [row for run in runs for row in run["rows"]]
    print(" + ".join(f"{path}: {run['device']} torch {run['torch']} triton {run['triton']}" for path, run in zip(paths, runs)))
    print_header()
    print_rows(rows)
    print_lowrank_overheads(rows)
    if json_path:
        with open(json_path, "w") as f:
            keep = ("device", "torch", "triton", "tokens", "timing", "chosen_configs")  # per run: picks differ by run
            json.dump({"merged_from": [{"path": path, **{k: run[k] for k in keep if k in run}}
                                       for path, run in zip(paths, runs)], "rows": rows,
                       "tuning": [t for run in runs for t in run.get("tuning", [])]}, f, indent=1)
    if plot_path:
        plot(rows, plot_path)


if __name__ == "__main__":
    main()
