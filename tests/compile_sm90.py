"""Compile every autotuner config of the Triton kernels for sm_90 (H100/H200) on this machine, no GPU needed;
prints one JSON line per (kernel, config). Run without TRITON_INTERPRET (tests/test_kernels_compile_sm90.py does).

The arguments get the specialisations the JIT gives them at run time: 16-byte divisible pointers and sizes, unit
strides as constants.
"""
import json
import traceback

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pixelfly_kernels import butterfly_matmul as kernels

SM90 = GPUTarget("cuda", 90, 32)
MM_COMMON = dict(F=3, RANK_BLOCK=32, UPCAST=False, DOT_PRECISION="tf32", EVEN_K=True, EVEN_N=True, TMA_ALIGNED=True, stride_ln=1)


def compile_sm90(jit_fn, config, constants, not_divisible=()):
    names = jit_fn.arg_names
    constants = {**constants, **config.kwargs}
    signature = {n: "constexpr" if n in constants else "*bf16" if n.endswith("_ptr") else "i32" for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in constants and n not in not_divisible}
    source = ASTSource(fn=jit_fn, signature=signature, constexprs={(names.index(n),): v for n, v in constants.items()},
                       attrs=attrs)
    return triton.compile(source, target=SM90, options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def cases():
    for partner_weight in (False, True):
        # forward reads the weight transposed (unit stride along K), dX as stored (unit stride along N)
        unit_stride = "stride_wn" if partner_weight else "stride_wk"
        constants = {**MM_COMMON, "PARTNER_WEIGHT": partner_weight, "HAS_BIAS": not partner_weight, unit_stride: 1}
        for config in kernels.MM_CONFIGS:
            yield "dX" if partner_weight else "forward", kernels._butterfly_mm_kernel.fn, config, constants, ("NUM_PROGRAMS",)
    for config in kernels.DW_CONFIGS:
        yield "dW", kernels._butterfly_dw_kernel, config, dict(F=3, UPCAST=False, DOT_PRECISION="tf32", TMA_ALIGNED=True), ()


def main():
    for product, jit_fn, config, constants, not_divisible in cases():
        row = {"product": product, "config": str(config), "tma": config.kwargs["USE_TMA"]}
        try:
            compiled = compile_sm90(jit_fn, config, constants, not_divisible)
            ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
            row.update(ok=True, shared_bytes=compiled.metadata.shared, wgmma="wgmma.mma_async" in ptx,
                       bulk_tensor_copies="cp.async.bulk.tensor" in ptx, pipelined="async_copy_global_to_local" in ttgir,
                       bulk_tensor_stores="cp.async.bulk.tensor.2d.global" in ptx)
        except Exception:
            row.update(ok=False, error=traceback.format_exc(limit=3)[-1500:])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
