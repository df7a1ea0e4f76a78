"""GPU timing shared by the benchmark scripts."""
import triton


def median_ms(fn, input_sets, warmup=25, rep=100):
    """Median ms of fn(*inputs), cycling through several input sets so the L2 cache does not serve them."""
    state = {"i": 0}

    def step():
        fn(*input_sets[state["i"] % len(input_sets)])
        state["i"] += 1

    return triton.testing.do_bench(step, warmup=warmup, rep=rep, return_mode="median")
