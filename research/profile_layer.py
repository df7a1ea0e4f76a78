"""Question: why is an eager PixelflyLinear forward+backward slower than its bare kernels? (The host: 1.29 ms per
step against 0.68 ms of GPU work at 4096->4096 through the custom op, docs/dev/benchmarks-log.md.)

    python research/profile_layer.py [--in 4096] [--out 4096] [--butterfly-size 16] [--n-factors 2] [--rank 0]

Prints: GPU time of the bare kernels (fwd + dX + dW), GPU time of the layer through autograd, the host time
per iteration when nothing waits for the GPU (if it exceeds the GPU time, the layer is CPU-bound), and the
profiler's table of the layer's ops.
"""
import argparse
import time

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from pixelfly_hf import PixelflyLinear
from pixelfly_kernels import butterfly_launch as kernels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--in", dest="in_f", type=int, default=4096)
    parser.add_argument("--out", dest="out_f", type=int, default=4096)
    parser.add_argument("--butterfly-size", type=int, default=16)
    parser.add_argument("--n-factors", type=int, default=2)
    parser.add_argument("--rank", type=int, default=0)
    args = parser.parse_args()
    dtype = torch.bfloat16
    layer = PixelflyLinear(args.in_f, args.out_f, bias=True, butterfly_size=args.butterfly_size, n_factors=args.n_factors,
                           rank=args.rank, block_size=16, device="cuda", dtype=dtype)
    x = torch.randn(args.tokens, args.in_f, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(args.tokens, args.out_f, device="cuda", dtype=dtype)
    w = layer.weight.detach()
    bs, F = args.butterfly_size, args.n_factors + 1

    def kernels_only():
        kernels.butterfly_matmul(x.detach(), w)
        kernels.butterfly_matmul_t(g, w)
        kernels.butterfly_matmul_dw(g, x.detach(), F, bs)

    def layer_step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(g)

    class DirectFunction(torch.autograd.Function):
        """The same products without the torch.library custom op around them, to price its dispatch."""

        @staticmethod
        def forward(ctx, a, weight, bias):
            ctx.save_for_backward(a, weight)
            return kernels.butterfly_matmul(a, weight, bias)

        @staticmethod
        def backward(ctx, grad):
            a, weight = ctx.saved_tensors
            return (kernels.butterfly_matmul_t(grad, weight), kernels.butterfly_matmul_dw(grad, a, F, bs),
                    grad.sum(0))

    def direct_step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        DirectFunction.apply(x, layer.weight, layer.bias).backward(g)

    compiled_layer = torch.compile(layer)

    def compiled_step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        compiled_layer(x).backward(g)

    t0 = time.perf_counter()
    compiled_step()
    torch.cuda.synchronize()
    print(f"  torch.compile(layer) first call {time.perf_counter() - t0:.1f} s")
    for fn in (kernels_only, layer_step, direct_step):
        fn()
    torch.cuda.synchronize()
    print(f"{args.in_f}->{args.out_f} bs={bs} k={args.n_factors} rank={args.rank} tokens={args.tokens}")
    print(f"  bare kernels fwd+dX+dW   GPU {triton.testing.do_bench(kernels_only, return_mode='median'):.3f} ms")
    print(f"  layer fwd+bwd (autograd) GPU {triton.testing.do_bench(layer_step, return_mode='median'):.3f} ms")
    print(f"  autograd.Function, no custom op GPU {triton.testing.do_bench(direct_step, return_mode='median'):.3f} ms")
    print(f"  torch.compile(layer) fwd+bwd GPU {triton.testing.do_bench(compiled_step, return_mode='median'):.3f} ms")
    for name, fn in (("bare kernels", kernels_only), ("layer fwd+bwd", layer_step), ("no custom op", direct_step),
                     ("compiled layer", compiled_step)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        host = (time.perf_counter() - t0) / 50 * 1e3
        torch.cuda.synchronize()
        print(f"  {name:<24} host time per iteration (no waiting) {host:.3f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            layer_step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
