"""The butterfly kernels' autotuner: Triton's (results cached on disk), with named configs, GPU time only, and a
key it has to time compiled first, every config at once in threads.

Compiling dominated a cold key (85 s for one 768 -> 3072 layout's products, ~0.5 s per config and up to ~50 configs
per key; docs/dev/optimisation-notes.md); the timing itself stays one config after another.
"""
import os
import sys

import torch
import triton
from triton.runtime import Autotuner

from .parallel_compile import compile_configs

# threads that compile a cold key's configs: one per CPU this process may use
COMPILE_THREADS = min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def time_graph_replays(kernel_call, quantiles):
    """The GPU time of one config: a CUDA graph of the call, replayed. Timing the call itself times Triton's launch
    path (tens of us of host time, more than a small product runs) whenever the host is slower than the kernel, and
    worst while other processes load the CPU: a table tuned by two processes at once had 48 of 120 picks differ
    from one tuned alone, a 1024 -> 4096 forward 0.069 -> 0.098 ms."""
    kernel_call()  # compile and load first: a config over the GPU's resources fails here, and the autotuner skips it
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel_call()
    return triton.testing.do_bench(graph.replay, quantiles=quantiles)


class GraphTimedAutotuner(Autotuner):
    """Autotunes `kernel` over `configs` (objects with a `triton_config()`, see butterfly_configs.py); `prune(configs,
    named_args)` keeps those a call's arguments can use."""

    def __init__(self, kernel, configs, key, prune, reset_to_zero=None):
        triton_configs = [c.triton_config() for c in configs]
        named = dict(zip(triton_configs, configs))
        as_triton = dict(zip(configs, triton_configs))

        def early_config_prune(candidates, named_args, **kwargs):
            kept = prune([named[c] for c in candidates], {**named_args, **kwargs})
            return [as_triton[c] for c in kept]

        super().__init__(kernel, kernel.arg_names, triton_configs, key, reset_to_zero, None,
                         prune_configs_by={"early_config_prune": early_config_prune},
                         do_bench=time_graph_replays, cache_results=True)
        self._call = None

    def run(self, *args, **kwargs):
        self._call = (args, kwargs)
        try:
            return super().run(*args, **kwargs)
        finally:
            self._call = None

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        def compile_then_time():
            # only on a key that is in no cache yet: the one wait a first run has, said while it happens
            print(f"pixelfly: tuning {self.base_fn.__name__} for a new shape ({len(configs)} configs, some seconds; "
                  "cached on disk for next time)", file=sys.stderr, flush=True)
            args, kwargs = self._call
            compile_configs(self.fn, args, kwargs, configs, COMPILE_THREADS)
            bench_fn()

        return super().check_disk_cache(tuning_key, configs, compile_then_time)
