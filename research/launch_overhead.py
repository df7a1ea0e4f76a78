"""Question: how much host time does one launch of a Pixelfly product cost in eager mode, and where does it go?

    python research/launch_overhead.py [--json PATH]

Under do_bench a product shorter than its launch measures the host (bench_linear's short rows), and eager
training pays that host time every step. This prints microseconds of host time per call, nothing waiting for the
GPU, for: a cuBLAS matmul; an empty Triton kernel; our forward through Triton's launch path (our launch cache
cleared before each call) and as a repeat call; the same compiled kernel launched directly (the floor of any
launcher); the forward as a torch custom op; the products' forward+backward through the eager autograd.Function
and through the custom op; the dX product called from the main thread, from a worker thread, and from autograd's
backward, which on CUDA runs in the engine's own thread (an eager training profile charged 0.63 ms of self CPU to
each backward dX call). Then cProfile's top functions for the dX call on the main thread and inside the backward.
"""
import argparse
import cProfile
import io
import json
import pstats
import threading
import time

import torch
import triton
import triton.language as tl

from pixelfly_hf import PixelflyLinear
from pixelfly_kernels import butterfly_launch as kernels
from pixelfly_kernels.butterfly_kernels import butterfly_mm_kernel
from pixelfly_kernels.ops import butterfly_linear, butterfly_mm
from pixelfly_kernels import launch_cache


@triton.jit
def _empty_kernel(ptr, n):
    pass


def host_us(fn, calls=100):
    """Host microseconds per call with nothing waiting: the launch queue holds far more than `calls` kernels."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def in_worker_thread(fn, calls=100):
    result = {}
    thread = threading.Thread(target=lambda: result.update(us=host_us(fn, calls)))
    thread.start()
    thread.join()
    return result["us"]


def profile_top(stats_source, lines=22):
    text = io.StringIO()
    pstats.Stats(stats_source, stream=text).sort_stats("tottime").print_stats(lines)
    return text.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--in", dest="in_f", type=int, default=1024)
    parser.add_argument("--out", dest="out_f", type=int, default=4096)
    parser.add_argument("--butterfly-size", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()
    dtype, dev = torch.bfloat16, "cuda"
    layer = PixelflyLinear(args.in_f, args.out_f, bias=False, butterfly_size=args.butterfly_size, n_factors=2,
                           rank=0, block_size=16, device=dev, dtype=dtype)
    w = layer.weight.detach()
    x = torch.randn(args.tokens, args.in_f, device=dev, dtype=dtype)
    g = torch.randn(args.tokens, args.out_f, device=dev, dtype=dtype)
    dense_w = torch.randn(args.out_f, args.in_f, device=dev, dtype=dtype)
    small = torch.empty(16, device=dev)

    kernels.butterfly_matmul(x, w)  # autotune first
    # the compiled kernel the autotuner picked, launched with its bound arguments directly (no autotuner,
    # heuristics or argument binding): what a launcher of our own could at best get down to
    captured = {}
    jit = butterfly_mm_kernel.fn
    original_run = jit.run

    def capture(*a, grid, warmup, **kw):
        compiled_kernel = original_run(*a, grid=grid, warmup=warmup, **kw)
        binder = jit.device_caches[torch.cuda.current_device()][4]
        bound, _, _ = binder(*a, **kw)
        captured.update(kernel=compiled_kernel, values=list(bound.values()),
                        grid=grid(bound) if callable(grid) else grid)
        return compiled_kernel

    jit.run = capture
    launch_cache.LAUNCHES.clear()  # so the call goes through Triton's path
    kernels.butterfly_matmul(x, w)
    jit.run = original_run
    launch_direct = captured["kernel"][tuple(captured["grid"]) + (1,) * (3 - len(captured["grid"]))]
    direct_values = captured["values"]

    class DxInBackward(torch.autograd.Function):
        profiler = None

        @staticmethod
        def forward(ctx, a):
            return a.clone()

        @staticmethod
        def backward(ctx, grad):
            prof = DxInBackward.profiler
            if prof is not None:
                prof.enable()
            kernels.butterfly_matmul_t(grad, w)
            if prof is not None:
                prof.disable()
            return grad  # the leaf's gradient accumulation, as in clone_only

    leaf = torch.randn(args.tokens, args.out_f, device=dev, dtype=dtype, requires_grad=True)

    def clone_only():
        leaf.clone().backward(g)

    def dx_in_backward():
        DxInBackward.apply(leaf).backward(g)

    rows = {
        "cuBLAS torch.mm forward": host_us(lambda: torch.mm(x, dense_w.t())),
        "empty Triton kernel": host_us(lambda: _empty_kernel[(1,)](small, 16)),
        "forward, Triton's launch path (autotuner, heuristics, binding)":
            host_us(lambda: (launch_cache.LAUNCHES.clear(), kernels.butterfly_matmul(x, w))),
        "forward, our launcher (repeat call)": host_us(lambda: kernels.butterfly_matmul(x, w)),
        "forward, compiled kernel launched directly": host_us(lambda: launch_direct(*direct_values)),
        "forward, torch custom op": host_us(lambda: torch.ops.pixelfly.butterfly_mm(x, w, None, None, None, "triton")),
        "dX, main thread": host_us(lambda: kernels.butterfly_matmul_t(g, w)),
        "dX, worker thread": in_worker_thread(lambda: kernels.butterfly_matmul_t(g, w)),
        "autograd clone + backward (no kernel)": host_us(clone_only),
        "autograd clone + backward with dX": host_us(dx_in_backward),
        "PixelflyLinear fwd+bwd": host_us(lambda: layer(x.requires_grad_()).backward(g)),
        # the products alone, fwd+bwd (dX and dW), as eager layers run them and through the custom op
        "products fwd+bwd, autograd.Function (eager path)":
            host_us(lambda: butterfly_linear(x.requires_grad_(), layer.weight, None, None, None, "triton")[0].backward(g)),
        "products fwd+bwd, custom op (compiled path, run eagerly)":
            host_us(lambda: butterfly_mm(x.requires_grad_(), layer.weight, None, None, None, "triton")[0].backward(g)),
    }
    x.requires_grad_(False)
    rows["dX in backward, net"] = rows["autograd clone + backward with dX"] - rows["autograd clone + backward (no kernel)"]
    print(f"{args.in_f}->{args.out_f} bs={args.butterfly_size} tokens={args.tokens}: host microseconds per call")
    for name, us in rows.items():
        print(f"  {name:<64} {us:8.1f}")

    main_prof = cProfile.Profile()
    main_prof.enable()
    for _ in range(20):
        kernels.butterfly_matmul_t(g, w)
    main_prof.disable()
    DxInBackward.profiler = cProfile.Profile()
    for _ in range(20):
        dx_in_backward()
    torch.cuda.synchronize()
    profiles = {"dX main thread, 20 calls": profile_top(main_prof),
                "dX inside autograd backward, 20 calls": profile_top(DxInBackward.profiler)}
    for name, text in profiles.items():
        print(f"--- cProfile, {name} ---\n{text}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "triton": triton.__version__, "device": torch.cuda.get_device_name(),
                       "host_us": rows, "profiles": profiles}, f, indent=1)


if __name__ == "__main__":
    main()
