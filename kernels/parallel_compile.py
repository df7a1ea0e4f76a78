"""Compiling several configs of one Triton kernel at once, in threads: the only module that touches a private Triton
API.

Triton has no public way to compile configs concurrently. Inside `triton.runtime._async_compile.AsyncCompileMode`
its JIT hands each compile to an executor instead of compiling in the caller, and the compiler releases the GIL, so
threads compile in parallel. The class is private: present in Triton 3.6 (the GPU runs) and 3.7 (CI here); setup.cfg
also allows 3.8, not checked. Should a Triton release move it, this module is the one place to change.
"""
from concurrent.futures import ThreadPoolExecutor

import triton
from triton.runtime._async_compile import AsyncCompileMode


def compile_configs(kernel, args, kwargs, configs: list[triton.Config], threads: int):
    """Compile `kernel` (a JIT function, or a heuristics wrapper around one) for every config without launching it.
    A config that fails to compile (more shared memory than the GPU has) is skipped here; its error surfaces again
    when the autotuner runs it, which skips it too."""
    with ThreadPoolExecutor(threads) as pool, AsyncCompileMode(pool, ignore_errors=True):
        for config in configs:
            kernel.run(*args, **{**kwargs, "warmup": True}, **config.all_kwargs())
