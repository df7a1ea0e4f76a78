"""Compile autotuner configs of the Triton kernels for sm_90 (H100/H200) on this machine, no GPU needed; prints one
JSON line per (kernel, config). Run without TRITON_INTERPRET (tests/test_kernels_compile_sm90.py does).

    python tests/compile_sm90.py                   # one config of each variant per product (variant_signature)
    python tests/compile_sm90.py --every-config    # every config
    python tests/compile_sm90.py --narrow-patches | --k-tail

The arguments get the specialisations the JIT gives them at run time: 16-byte divisible pointers and sizes, unit
strides as constants.
"""
import json
import re
import sys
import traceback

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pixelfly_kernels.butterfly_configs import DW_CONFIGS, DW_SPLIT_CONFIGS, MM_CONFIGS, DwConfig, MatmulConfig
from pixelfly_kernels.butterfly_kernels import butterfly_dw_kernel, butterfly_mm_kernel, k_tail, pow2_divisor

SM90 = GPUTarget("cuda", 90, 32)
MM_COMMON = dict(F=3, RANK_BLOCK=32, UPCAST=False, DOT_PRECISION="tf32", EVEN_K=True, EVEN_N=True, TMA_ALIGNED=True, stride_ln=1,
                 K_ALIGN=16, N_ALIGN=16, TAIL_K=0, K_CHUNK=64, REST_N=0)
FLAT_K_PATCH = dict(EVEN_K=False, K_CHUNK=16)  # K steps across slots are offered where 64 does not divide K: 48 here


DW_COMMON = dict(F=3, UPCAST=False, DOT_PRECISION="tf32", TMA_ALIGNED=True, Q_ALIGN=16, P_ALIGN=16, SLOTS=4, REST_N=0)


def compile_sm90(jit_fn, config, constants, not_divisible=()):
    names = jit_fn.arg_names
    constants = {**constants, **config.kwargs}
    signature = {n: "constexpr" if n in constants else "*bf16" if n.endswith("_ptr") else "i32" for n in names}
    if constants.get("ATOMIC"):
        signature["dw_ptr"] = "*fp32"  # the token-split dW adds into an fp32 buffer
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in constants and n not in not_divisible}
    source = ASTSource(fn=jit_fn, signature=signature, constexprs={(names.index(n),): v for n, v in constants.items()},
                       attrs=attrs)
    return triton.compile(source, target=SM90, options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def variant_signature(config: triton.Config) -> tuple:
    """What selects different code in a kernel: its flags, token splits, grouped tile orders, and 32-row tiles (too
    short for wgmma)."""
    kw = config.kwargs
    return (kw["USE_TMA"], kw.get("PERSISTENT"), kw.get("TMA_STORE"), kw.get("GROUP_M", 0) > 0, kw.get("FLAT_K"),
            kw.get("ALL_SLOTS"), kw.get("SPLIT_K", 1) > 1, kw["FULL_PATCH_N"], kw["BLOCK_M"] == 32)


def representative(configs: list[triton.Config]) -> list[triton.Config]:
    """The first config of each variant_signature, in list order."""
    first = {}
    for config in configs:
        first.setdefault(variant_signature(config), config)
    return list(first.values())


def cases(every_config=False):
    """(product, jit function, triton config, constants, arguments not 16-divisible) per config to compile."""
    def pick(configs):
        configs = [c.triton_config() for c in configs]
        return configs if every_config else representative(configs)

    for partner_weight in (False, True):
        # forward reads the weight transposed (unit stride along K), dX as stored (unit stride along N)
        unit_stride = "stride_wn" if partner_weight else "stride_wk"
        aligns = {"WN_ALIGN": 1, "WK_ALIGN": 16} if partner_weight else {"WN_ALIGN": 16, "WK_ALIGN": 1}
        constants = {**MM_COMMON, **aligns, "PARTNER_WEIGHT": partner_weight, "HAS_BIAS": not partner_weight, unit_stride: 1}
        for config in pick(MM_CONFIGS):
            flat = FLAT_K_PATCH if config.kwargs["FLAT_K"] else {}
            # whole-patch tiles: the rest the narrowest patch they serve leaves (48 = 32 + 16, 160 = 128 + 32)
            rest = {"REST_N": max(16, config.kwargs["BLOCK_N"] // 4)} if config.kwargs["FULL_PATCH_N"] else {}
            yield "dX" if partner_weight else "forward", butterfly_mm_kernel.fn, config, {**constants, **flat, **rest}, ("NUM_PROGRAMS",)
    for atomic, configs in ((False, DW_CONFIGS), (True, DW_SPLIT_CONFIGS)):
        for config in pick(configs):
            constants = {**DW_COMMON, "ATOMIC": atomic}
            if config.kwargs["FULL_PATCH_N"]:
                constants["REST_N"] = max(16, config.kwargs["BLOCK_N"] // 4)
            if config.kwargs["ALL_SLOTS"]:  # the most slots the pruning lets this tile take (accumulator <= 128 x 256)
                slots = min(4, 128 * 256 // (config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]))
                constants.update(F=slots, SLOTS=slots)
            yield "dW split" if atomic else "dW", butterfly_dw_kernel.fn, config, constants, ()


def narrow_patch_cases():
    """Forward, dX and dW where a patch is 40 or 24 wide (1280- and 768-wide models at butterfly size 32): Triton
    proves nothing about such sizes, so the kernels get their divisibility from the *_ALIGN constexprs, computed by
    the same heuristics as at run time. Forward and dX also with K steps across slots (FLAT_K: 8-element chunks)."""
    pointer = MatmulConfig(128, 64, 64, 4, 4).triton_config()
    flat_k = MatmulConfig(128, 64, 64, 4, 4, flat_k=True).triton_config()
    dw_pointer = DwConfig(128, 64, 64, 4, 4).triton_config()
    align = pow2_divisor
    for q, p in ((160, 40), (96, 24)):
        for partner_weight in (False, True):
            n_patch, k_patch = (p, q) if partner_weight else (q, p)
            strides = {"stride_wn": 1, "stride_wk": p} if partner_weight else {"stride_wn": p, "stride_wk": 1}
            unit, other = ("stride_wn", "stride_wk") if partner_weight else ("stride_wk", "stride_wn")
            constants = {**MM_COMMON, "RANK_BLOCK": 0, "PARTNER_WEIGHT": partner_weight, "HAS_BIAS": not partner_weight,
                         unit: 1, "EVEN_K": False, "EVEN_N": False, "K_ALIGN": align(k_patch), "N_ALIGN": align(n_patch),
                         "WN_ALIGN": align(strides["stride_wn"]), "WK_ALIGN": align(strides["stride_wk"]),
                         "K_CHUNK": align(k_patch, 64)}
            for config, label in ((pointer, ""), (flat_k, " flat-K")):
                yield (f"{'dX' if partner_weight else 'forward'} q={q} p={p}{label}", butterfly_mm_kernel.fn,
                       config, constants, ("NUM_PROGRAMS", "N_PATCH", "K_PATCH", other))
        dw_constants = {**DW_COMMON, "TMA_ALIGNED": False, "ATOMIC": False, "Q_ALIGN": align(q), "P_ALIGN": align(p)}
        yield f"dW q={q} p={p}", butterfly_dw_kernel.fn, dw_pointer, dw_constants, ("Q", "P")


def k_tail_cases():
    """Forward and dX over 80-wide K patches (1280-wide models at butterfly size 16): 64-wide steps plus a 16-wide
    tail step per slot, for the usual persistent TMA winner and a pointer config."""
    persistent_tma = next(c for c in MM_CONFIGS if c.persistent and not c.tma_store
                          and (c.block_m, c.block_n, c.block_k) == (128, 256, 64)).triton_config()
    pointer = next(c for c in MM_CONFIGS if not c.use_tma
                   and (c.block_m, c.block_n, c.block_k) == (128, 128, 64)).triton_config()
    for partner_weight in (False, True):
        unit_stride = "stride_wn" if partner_weight else "stride_wk"
        aligns = {"WN_ALIGN": 1, "WK_ALIGN": 16} if partner_weight else {"WN_ALIGN": 16, "WK_ALIGN": 1}
        constants = {**MM_COMMON, **aligns, "PARTNER_WEIGHT": partner_weight, "HAS_BIAS": not partner_weight,
                     unit_stride: 1, "EVEN_K": False, "TAIL_K": k_tail(80, 64)}
        for config in (persistent_tma, pointer):
            yield "dX" if partner_weight else "forward", butterfly_mm_kernel.fn, config, constants, ("NUM_PROGRAMS",)


def main():
    if sys.argv[1:] == ["--k-tail"]:
        for product, jit_fn, config, constants, not_divisible in k_tail_cases():
            compiled = compile_sm90(jit_fn, config, constants, not_divisible)
            ptx = compiled.asm["ptx"]
            print(json.dumps({"product": product, "config": str(config), "tma": config.kwargs["USE_TMA"],
                              "shared_bytes": compiled.metadata.shared, "wgmma": "wgmma.mma_async" in ptx,
                              "bulk_tensor_copies": "cp.async.bulk.tensor" in ptx}), flush=True)
        return
    if sys.argv[1:] == ["--narrow-patches"]:
        for name, jit_fn, config, constants, not_divisible in narrow_patch_cases():
            ptx = compile_sm90(jit_fn, config, constants, not_divisible).asm["ptx"]
            print(json.dumps({"case": name, "async_copies_16_bytes": len(re.findall(r"cp\.async\.cg\.shared\.global.*0x10", ptx)),
                              "two_byte_accesses": len(re.findall(r"(?:ld|st)\.global(?:\.\w+)*\.b16", ptx)),
                              "vector_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v[24]\.", ptx))}), flush=True)
        return
    for product, jit_fn, config, constants, not_divisible in cases(every_config=sys.argv[1:] == ["--every-config"]):
        row = {"product": product, "config": str(config), "tma": config.kwargs["USE_TMA"]}
        try:
            compiled = compile_sm90(jit_fn, config, constants, not_divisible)
            ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
            row.update(ok=True, shared_bytes=compiled.metadata.shared, wgmma="wgmma.mma_async" in ptx,
                       bulk_tensor_copies="cp.async.bulk.tensor" in ptx, pipelined="async_copy_global_to_local" in ttgir,
                       bulk_tensor_stores="cp.async.bulk.tensor.2d.global" in ptx,
                       vector_atomic_adds=bool(re.search(r"(?:atom|red)\.global[\w.]*\.add[\w.]*\.v[248]\.f32", ptx)))
        except Exception:
            row.update(ok=False, error=traceback.format_exc(limit=3)[-1500:])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
