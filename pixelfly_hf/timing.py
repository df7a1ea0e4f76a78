"""Timing shared by the benchmark and research scripts: triton's do_bench on the GPU, a plain median on CPU (dry runs)."""
import statistics
import time

import torch


# False: triton's do_bench, one launch at a time from Python (what an eager caller gets; a launch whose host side
# outlasts do_bench's L2 flush is timed with the GPU idle). True: the calls replayed from a CUDA graph, so the time
# is the GPU's alone (what a compiled model under CUDA graphs gets); the input sets still rotate inside the graph.
CUDA_GRAPHS = False
# True: each fn runs once, untimed (NaN): a run that only compiles and autotunes, filling Triton's autotuner cache
# on disk (TRITON_CACHE_DIR) so that a later run, in a later GPU call, measures without tuning
TUNE_ONLY = False


def median_ms(fn, input_sets, warmup=25, rep=100):
    """Median ms of fn(*inputs), cycling through several input sets so the L2 cache does not serve them."""
    state = {"i": 0}

    def step():
        fn(*input_sets[state["i"] % len(input_sets)])
        state["i"] += 1

    if TUNE_ONLY:
        step()
        return float("nan")
    if not torch.cuda.is_available():
        return cpu_median_ms(step)
    import triton.testing

    if CUDA_GRAPHS:
        step()  # compile and autotune outside the capture
        return triton.testing.do_bench_cudagraph(step, rep=rep, return_mode="median")
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
