"""Question: is one eager forward+backward of the registered attention (our Triton kernels) host- or GPU-bound?

    python research/profile_attention_eager.py [--trace trace.json]      # GPU, ~40 s

Causal, head dim 64, S = 4096, batch 4, 16 heads, bf16. Prints the host's enqueue time per step (nothing waiting
on the GPU), the back-to-back step time, do_bench and do_bench_cudagraph medians, and a torch.profiler table of
five steps (each after an L2 flush): why the attention table's eager column is slower than its CUDA-graph column
(docs/dev/optimisation-notes.md, "A2" and "A3"). The numbers in docs/dev/benchmarks-log.md came from an untidied
copy making the same measurements; this file itself has not run on a GPU.
"""
import argparse
import json
import time

import torch
import transformers
import triton.testing
from torch.profiler import ProfilerActivity, profile

from pixelfly_hf.config import PixelflyAttentionConfig
from pixelfly_hf.layers.attention import pattern_of, pixelfly_attention_forward


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", help="write the profiler's chrome trace here")
    args = parser.parse_args(argv)
    owner = torch.nn.Module()
    owner.is_causal = True
    owner.config = transformers.PretrainedConfig(pixelfly_attention=PixelflyAttentionConfig().to_dict())
    q, k, v = (torch.randn(4, 16, 4096, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def step():
        for t in (q, k, v):
            t.grad = None
        pixelfly_attention_forward(owner, q, k, v, None)[0].transpose(1, 2).backward(grad)

    for _ in range(5):  # compile, autotune, fill the launch cache
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        step()
    result = {"host_us_per_step_enqueue": (time.perf_counter() - start) / 50 * 1e6}
    torch.cuda.synchronize()
    result["ms_per_step_back_to_back"] = (time.perf_counter() - start) / 50 * 1e3
    result["do_bench_ms"] = triton.testing.do_bench(step, return_mode="median")
    result["do_bench_cudagraph_ms"] = triton.testing.do_bench_cudagraph(step, return_mode="median")
    print(json.dumps(result))
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int, device="cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            flush.zero_()
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
