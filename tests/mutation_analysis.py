"""What torch.compile believes each Triton kernel writes, on this machine, no GPU needed; prints one JSON line per
(kernel, variant). Run without TRITON_INTERPRET (tests/test_kernels_compile_sm90.py does).

Inductor reads a user kernel's TTIR to find the tensors it stores to. If the analysis fails it treats every pointer
argument as written (copies of X and dY each step); if it missed a store (say one made through a TMA descriptor
built inside the kernel) it could reuse that output's buffer. The TTIR is generated for sm_90 through a stand-in
driver that only names the target.
"""
import json

import torch
import triton
from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
from triton.backends.compiler import GPUTarget

from pixelfly_kernels.butterfly_kernels import butterfly_dw_kernel, butterfly_mm_kernel


class Sm90Target:
    """The two driver calls TTIR generation makes."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0


def forward_args(tma, persistent, tma_store, flat_k=False, rest_n=0, tokens=256, B=4, F=3, q=128, p=64, rank=32):
    a, w = torch.randn(tokens, B * p), torch.randn(B, F, q, p)
    bias, z, l, out = torch.randn(B * q), torch.randn(tokens, rank), torch.randn(rank, B * q), torch.empty(tokens, B * q)
    values = (a, w, bias, z, l, out, tokens, q, p, rank, B, 132, a.stride(0), out.stride(0), F * q * p, q * p, p, 1,
              z.stride(0), l.stride(0), 1)
    args = dict(zip(butterfly_mm_kernel.fn.arg_names, values))
    return {**args, "F": F, "PARTNER_WEIGHT": False, "HAS_BIAS": True, "RANK_BLOCK": 32, "UPCAST": False,
            "DOT_PRECISION": "tf32", "EVEN_K": True, "EVEN_N": True, "TMA_ALIGNED": True, "BLOCK_M": 64, "BLOCK_N": 64,
            "BLOCK_K": 64, "USE_TMA": tma, "PERSISTENT": persistent, "TMA_STORE": tma_store, "GROUP_M": 8 if persistent else 0,
            "FLAT_K": flat_k, "K_CHUNK": 64, "FULL_PATCH_N": rest_n > 0, "REST_N": rest_n,
            "K_ALIGN": 16, "N_ALIGN": 16, "WN_ALIGN": 16, "WK_ALIGN": 1, "TAIL_K": 0}


def dw_args(tma, atomic=False, tokens=256, B=4, F=3, q=64, p=64):
    g, x, dw = torch.randn(tokens, B * q), torch.randn(tokens, B * p), torch.empty(B, F, q, p)
    values = (g, x, dw, tokens, q, p, B, g.stride(0), x.stride(0))
    args = dict(zip(butterfly_dw_kernel.fn.arg_names, values))
    return {**args, "F": F, "UPCAST": False, "DOT_PRECISION": "tf32", "TMA_ALIGNED": True, "ATOMIC": atomic, "BLOCK_M": 64,
            "BLOCK_N": 64, "BLOCK_K": 64, "USE_TMA": tma, "ALL_SLOTS": atomic and not tma, "SPLIT_K": 2 if atomic else 1,
            "Q_ALIGN": 16, "P_ALIGN": 16, "SLOTS": 4, "FULL_PATCH_N": False, "REST_N": 0}


def cases():
    for tma, persistent, tma_store in ((False, False, False), (True, False, False), (True, True, False), (True, True, True)):
        yield (f"forward tma={tma} persistent={persistent} tma_store={tma_store}", butterfly_mm_kernel.fn,
               forward_args(tma, persistent, tma_store))
    yield "forward flat_k", butterfly_mm_kernel.fn, forward_args(False, False, False, flat_k=True)
    # a tile across the whole patch: the rest's columns stored by pointers beside the descriptor store
    yield "forward full_patch_n", butterfly_mm_kernel.fn, forward_args(True, True, True, rest_n=32)
    for tma, atomic in ((False, False), (True, False), (False, True), (True, True)):
        yield f"dW tma={tma} atomic={atomic}", butterfly_dw_kernel.fn, dw_args(tma, atomic)


def main():
    triton.runtime.driver.set_active(Sm90Target())  # for this process only: it exits after printing
    for name, kernel, args in cases():
        accesses = identify_accessed_tensors(kernel, args, {})
        print(json.dumps({"case": name, "writes": sorted(d.name for d in accesses.read_writes.writes),
                          "reads": sorted(d.name for d in accesses.read_writes.reads)}), flush=True)


if __name__ == "__main__":
    main()
