"""The launchers of the butterfly kernels: Y = X @ S^T, dX = dY @ S and dW, each autotuned on the GPU (autotune.py
over butterfly_configs.py), with a fixed tile in the interpreter, or with an explicit config.

Repeat calls (eager, or the custom ops in a torch.compile graph) go through the launch cache (launch_cache.py).
"""
import functools
import os

import torch
import triton

from .autotune import GraphTimedAutotuner
from .butterfly_configs import (DW_CONFIGS, DW_SPLIT_CONFIGS, MM_CONFIGS, DwConfig, MatmulConfig, prune_dw, prune_matmul,
                                whole_k_tiles)
from .butterfly_kernels import butterfly_dw_kernel, butterfly_mm_kernel, config_rest, rest_width
from .launch_cache import launch_tuned

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# RANK_BLOCK in the key: the low-rank segment changes what is fastest
_butterfly_mm_tuned = GraphTimedAutotuner(
    butterfly_mm_kernel, MM_CONFIGS, ["M", "N_PATCH", "K_PATCH", "F", "PARTNER_WEIGHT", "RANK_BLOCK", "TMA_ALIGNED"],
    prune_matmul)
_DW_KEY = ["M", "Q", "P", "F", "TMA_ALIGNED"]
_butterfly_dw_tuned = GraphTimedAutotuner(butterfly_dw_kernel, DW_CONFIGS, _DW_KEY, prune_dw)
# the autotuner runs every config into the same buffer: zero it before each (and before the chosen one's real run)
_butterfly_dw_split_tuned = GraphTimedAutotuner(butterfly_dw_kernel, DW_SPLIT_CONFIGS, _DW_KEY, prune_dw,
                                                reset_to_zero=["dw_ptr"])


def _tma_aligned(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need 16-byte aligned base addresses and row strides."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in tensors)


def _tma_scratch(size: int, alignment: int, stream):
    # device-side descriptors live in a small global scratch buffer that Triton asks the allocator for
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def _check_matmul_config(config: MatmulConfig, tma_aligned: bool, k_patch: int, n_patch: int):
    if config.use_tma and not (tma_aligned and whole_k_tiles(k_patch, config.block_k)):
        raise ValueError(f"{config} asks for TMA, but the operands are not 16-byte aligned or block_k={config.block_k} "
                         f"leaves a rest of the patch width {k_patch} that is not a power of 2 >= 16; use a config "
                         "without TMA")
    if config.tma_store and not tma_aligned:
        raise ValueError(f"{config} asks for descriptor stores, but the operands are not 16-byte aligned; "
                         "set tma_store=False")
    if config.flat_k and config.use_tma:
        raise ValueError(f"{config} asks for TMA and K steps across slots; those gather their K by pointer loads: "
                         "set use_tma=False")
    _check_full_patch(config, n_patch)


def _check_dw_config(config: DwConfig, tma_aligned: bool, n_patch: int):
    if config.use_tma and not tma_aligned:
        raise ValueError(f"{config} asks for TMA, but the operands are not 16-byte aligned; use a config without TMA")
    if config.all_slots and (config.use_tma or config.full_patch_n):
        raise ValueError(f"{config} asks for all slots per program with TMA or a tile across the patch; the gathered X "
                         "tile needs pointer loads and one column width: set use_tma=False, full_patch_n=False")
    if config.full_patch_n and not tma_aligned:
        raise ValueError(f"{config} asks for a dW tile across the patch, but dY or X is not 16-byte aligned (an "
                         "illegal memory access on the H200, see butterfly_configs.prune_dw): set full_patch_n=False")
    _check_full_patch(config, n_patch)


def _check_full_patch(config, n_patch: int):
    if config.full_patch_n and not rest_width(n_patch, config.block_n):
        raise ValueError(f"{config} asks for one tile across the patch, but the patch is {n_patch} wide: that needs "
                         "block_n plus a narrower power of 2 of at least 16; set full_patch_n=False")


def _launch(kernel, tuned, grid, args, kwargs, config):
    """Run with an explicit (checked) config, or with the autotuner when config is None."""
    # per launch, not once: the allocator is a ContextVar, and autograd runs the backward in its own thread
    triton.set_allocator(_tma_scratch)
    if config is None:
        launch_tuned(tuned, grid, args, kwargs)
        return
    meta = config.meta()
    kernel[grid(meta)](*args, **kwargs, **meta, num_warps=config.num_warps, num_stages=config.num_stages)


def _tile(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    # persistent programs: one per SM; the interpreter gets a few, so tests walk several tiles per program
    return 3 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting, so the kernel matches F.linear's precision; half inputs
    # ignore the flag ("tf32" is tl.dot's default)
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _check(name: str, t: torch.Tensor, dim: int):
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels take float16, bfloat16 or float32")
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"{name} is on {t.device}; the Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before "
            "pixelfly_kernels is imported (CPU interpreter, slow), or backend='reference'."
        )


def _output(out, shape, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {like.dtype} tensor of shape {tuple(shape)}, got {tuple(out.shape)}")
    return out


def _launch_mm(a, weight, bias, z, lowrank, partner_weight: bool, out, config) -> torch.Tensor:
    _check("input", a, 2)
    _check("weight", weight, 4)
    B, F, q, p = weight.shape
    n_patch, k_patch = (p, q) if partner_weight else (q, p)
    if a.shape[1] != B * k_patch:
        raise ValueError(f"input has {a.shape[1]} features, the weight expects {B * k_patch}")
    a = a if a.stride(1) == 1 else a.contiguous()
    weight = weight.contiguous()
    M = a.shape[0]
    out = _output(out, (M, B * n_patch), a)
    sr, sj, sq, sp = weight.stride()
    stride_wn, stride_wk = (sp, sq) if partner_weight else (sq, sp)
    rank = 0 if z is None else z.shape[1]
    if rank:
        z = z if z.stride(1) == 1 else z.contiguous()
        # the segment reads a (rank x columns) factor: V (rank x in) as stored for dX; U (out x rank) for the
        # forward, transposed into a contiguous copy (tiny) so the loads along the output columns coalesce
        lowrank = lowrank if partner_weight else lowrank.t().contiguous()
        stride_lk, stride_ln = lowrank.stride(0), lowrank.stride(1)
    else:
        stride_lk = stride_ln = 0

    num_sms = _num_sms(a.device)

    def grid(meta):
        tiles = (triton.cdiv(M, meta["BLOCK_M"]), B * triton.cdiv(n_patch, meta["BLOCK_N"] + config_rest(n_patch, meta)))
        return (min(num_sms, tiles[0] * tiles[1]), 1) if meta["PERSISTENT"] else tiles

    args = (a, weight, bias if bias is not None else a, z if rank else a, lowrank if rank else a, out,
            M, n_patch, k_patch, rank, B, num_sms, a.stride(0), out.stride(0), sr, sj, stride_wn, stride_wk,
            z.stride(0) if rank else 0, stride_lk, stride_ln)
    kwargs = dict(F=F, PARTNER_WEIGHT=partner_weight, HAS_BIAS=bias is not None,
                  RANK_BLOCK=max(16, triton.next_power_of_2(rank)) if rank else 0,
                  UPCAST=INTERPRET, DOT_PRECISION=_dot_precision(a.dtype), TMA_ALIGNED=_tma_aligned(a, weight.view(-1, p), out))
    if config is None and INTERPRET:  # the interpreter cannot time configs: a fixed tile
        config = MatmulConfig(_tile(M, 16, 128), _tile(n_patch, 16, 128), _tile(k_patch, 16, 64), 4, 3)
    if config is not None:
        _check_matmul_config(config, kwargs["TMA_ALIGNED"], k_patch, n_patch)
    _launch(butterfly_mm_kernel, _butterfly_mm_tuned, grid, args, kwargs, config)
    return out


def butterfly_matmul(x, weight, bias=None, z=None, lowrank_u=None, out=None, config=None) -> torch.Tensor:
    """Y = X @ S^T (+ Z @ U^T) (+ bias): x (T, in), weight (B, F, q, p), z = X @ V^T (T, rank), U (out, rank).

    config: a MatmulConfig to bypass the autotuner (tests, benchmarks); the same for butterfly_matmul_t.
    """
    return _launch_mm(x, weight, bias, z, lowrank_u, partner_weight=False, out=out, config=config)


def butterfly_matmul_t(grad, weight, dz=None, lowrank_v=None, out=None, config=None) -> torch.Tensor:
    """dX = dY @ S (+ dZ @ V): grad (T, out), weight (B, F, q, p), dz = dY @ U (T, rank), V (rank, in)."""
    return _launch_mm(grad, weight, None, dz, lowrank_v, partner_weight=True, out=out, config=config)


def _dw_token_split(tiles: int, num_sms: int) -> bool:
    """Less than one wave of 128 x 128 dW tiles: the split kernel can spread the tokens over the idle SMs. Its
    atomic adds sum in no fixed order, so not under torch.use_deterministic_algorithms."""
    return tiles < num_sms and not torch.are_deterministic_algorithms_enabled()


def butterfly_matmul_dw(grad: torch.Tensor, x: torch.Tensor, n_slots: int, butterfly_size: int, out=None, config=None) -> torch.Tensor:
    """dW[r, j] = dY[:, r]^T @ X[:, r ^ o_j]: grad (T, out), x (T, in) -> (B, F, q, p) in x's dtype.

    config: a DwConfig to bypass the autotuner; split_k > 1 sums the token splits atomically in fp32.
    """
    _check("grad", grad, 2)
    _check("input", x, 2)
    if grad.shape[0] != x.shape[0]:
        raise ValueError(f"grad has {grad.shape[0]} rows and input {x.shape[0]}; they must match")
    B, F = butterfly_size, n_slots
    q, p = grad.shape[1] // B, x.shape[1] // B
    grad = grad if grad.stride(1) == 1 else grad.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    M = x.shape[0]
    dw = _output(out, (B, F, q, p), x)
    tma_aligned = _tma_aligned(grad, x)
    if config is None and INTERPRET:  # the interpreter cannot time configs: a fixed tile
        config = DwConfig(_tile(q, 16, 128), _tile(p, 16, 128), _tile(M, 16, 64), 4, 3)
    if config is None:
        atomic = _dw_token_split(B * F * triton.cdiv(q, 128) * triton.cdiv(p, 128), _num_sms(x.device))
    else:
        _check_dw_config(config, tma_aligned, p)
        atomic = config.split_k > 1
    # the atomic kernel adds into zeroed fp32 (dW itself when it is fp32)
    target = (dw.zero_() if dw.dtype == torch.float32 else torch.zeros(dw.shape, dtype=torch.float32, device=dw.device)) if atomic else dw

    def grid(meta):
        tiles_p = triton.cdiv(p, meta["BLOCK_N"] + config_rest(p, meta))
        return B * (1 if meta["ALL_SLOTS"] else F), triton.cdiv(q, meta["BLOCK_M"]) * tiles_p, meta["SPLIT_K"]

    args = (grad, x, target, M, q, p, B, grad.stride(0), x.stride(0))
    kwargs = dict(F=F, UPCAST=INTERPRET, DOT_PRECISION=_dot_precision(x.dtype), TMA_ALIGNED=tma_aligned, ATOMIC=atomic)
    tuned = _butterfly_dw_split_tuned if atomic else _butterfly_dw_tuned
    _launch(butterfly_dw_kernel, tuned, grid, args, kwargs, config)
    if target is not dw:
        dw.copy_(target)
    return dw
