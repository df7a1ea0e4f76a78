"""Timing shared by the benchmark scripts: triton's do_bench on the GPU, a plain median on CPU (dry runs)."""
import statistics
import time

import torch


def median_ms(fn, input_sets, warmup=25, rep=100):
    """Median ms of fn(*inputs), cycling through several input sets so the L2 cache does not serve them."""
    state = {"i": 0}

    def step():
        fn(*input_sets[state["i"] % len(input_sets)])
        state["i"] += 1

    if not torch.cuda.is_available():
        return cpu_median_ms(step)
    import triton.testing

    return triton.testing.do_bench(step, warmup=warmup, rep=rep, return_mode="median")


def cpu_median_ms(fn, reps=3):
    """Median wall-clock ms of fn() after one warm-up call (CPU dry runs: checks that a script runs, not speed)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
