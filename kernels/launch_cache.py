"""Repeat launches of autotuned Triton kernels without Triton's launch path.

Per (autotuned kernel, device, argument signature) the cache keeps the compiled kernel the autotuner picked, its
grid and its argument list with the tensors left out. Triton's own path (autotuner, heuristics, argument binding)
costs ~150 us of host time per call on the H200's host, more than many of our kernels run (docs/dev/optimisation-notes.md,
"do_bench measures the launch"); a repeat call only puts its tensors into the list.
"""
import threading

import torch
from triton.runtime.autotuner import Heuristics

LAUNCHES = {}
# the first call reads the autotuner's best_config after running it: one thread at a time (nn.DataParallel runs
# replicas, and autograd the backward, in threads of their own)
_FIRST_LAUNCH = threading.Lock()


def _signature(args, kwargs) -> tuple:
    """Everything Triton specialises a compiled kernel on: integer values, tensor dtypes, 16-byte aligned bases."""
    return tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args) + tuple(kwargs.values())


def launch_tuned(tuned, grid, args, kwargs):
    """tuned[grid](*args, **kwargs) for an autotuned kernel (optionally over a heuristics wrapper): args are the
    runtime arguments in order, kwargs the constexprs the autotuner does not choose."""
    key = (tuned, torch.cuda.current_device(), _signature(args, kwargs))
    cached = LAUNCHES.get(key)
    if cached is None:
        with _FIRST_LAUNCH:
            compiled = tuned[grid](*args, **kwargs)
            config = tuned.best_config
        # the meta-parameters as the autotuner and then the heuristics wrapper (if any) add them
        meta = {**kwargs, **config.all_kwargs()}
        jit = tuned.fn
        if isinstance(jit, Heuristics):
            for name, rule in jit.values.items():
                meta[name] = rule({**dict(zip(jit.arg_names, args)), **meta})
            jit = jit.fn
        names = jit.arg_names  # runtime arguments first, then the constexprs
        values = [None if isinstance(a, torch.Tensor) else a for a in args] + [meta[n] for n in names[len(args):]]
        slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        g = tuple(grid(meta))
        LAUNCHES[key] = (compiled[g + (1,) * (3 - len(g))], values, slots)
        return
    run, values, slots = cached
    values = list(values)
    for i in slots:
        values[i] = args[i]
    run(*values)
