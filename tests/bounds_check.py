"""Out-of-bounds memory accesses of Triton kernels, caught on CPU.

The interpreter reads and writes raw addresses: a load past a tensor's end returns whatever lies there and a store
corrupts it, silently, where the GPU stops with an illegal memory access (session 9: a config that passed every
interpreter test crashed the GPU). Inside `checked_accesses()` every load, store and atomic a kernel issues under
its mask must fall inside the storage of one of the tensors that launch was given, or an AssertionError names the
access, the first bad address and the ranges. tests/conftest.py applies it to every test that runs in the interpreter.
"""
import contextlib

import numpy as np
from triton.runtime import interpreter


@contextlib.contextmanager
def checked_accesses():
    ranges = []  # (start, end) of each host storage the running launch was given
    init_args = interpreter.GridExecutor._init_args_hst
    builder = interpreter.InterpreterBuilder
    load, store, atomic = builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw

    def recording_init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        ranges.clear()
        for arg in [*args_hst, *kwargs_hst.values()]:
            base = getattr(arg, "base", arg)  # a TensorDescriptor's tensor
            if hasattr(base, "untyped_storage"):
                storage = base.untyped_storage()
                ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        return args_hst, kwargs_hst

    def check(what, ptrs, mask):
        itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
        addresses = np.broadcast_to(ptrs.data, np.shape(mask.data))[np.asarray(mask.data, dtype=bool)].astype(np.uint64)
        inside = np.zeros(addresses.shape, dtype=bool)
        for start, end in ranges:
            inside |= (addresses >= start) & (addresses + itemsize <= end)
        assert inside.all(), (f"{what} outside every tensor of the launch: first bad address "
                              f"{int(addresses[~inside][0]):#x} ({int((~inside).sum())} of {addresses.size}), "
                              f"ranges {[(hex(s), e - s) for s, e in ranges]}")

    def checked_load(self, ptrs, mask, other, *args, **kwargs):
        check("load", ptrs, mask)
        return load(self, ptrs, mask, other, *args, **kwargs)

    def checked_store(self, ptrs, value, mask, *args, **kwargs):
        check("store", ptrs, mask)
        return store(self, ptrs, value, mask, *args, **kwargs)

    def checked_atomic(self, op, ptrs, val, mask, *args, **kwargs):
        check("atomic", ptrs, mask)
        return atomic(self, op, ptrs, val, mask, *args, **kwargs)

    patches = [(interpreter.GridExecutor, "_init_args_hst", recording_init_args, init_args),
               (builder, "create_masked_load", checked_load, load), (builder, "create_masked_store", checked_store, store),
               (builder, "create_atomic_rmw", checked_atomic, atomic)]
    try:
        for owner, name, checked, _ in patches:
            setattr(owner, name, checked)
        yield
    finally:
        for owner, name, _, original in patches:
            setattr(owner, name, original)
