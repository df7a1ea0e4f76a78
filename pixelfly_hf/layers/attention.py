"""Pixelfly attention for transformers: the registered "pixelfly" attention function and mask function, and
dispatch between dense SDPA, the PyTorch reference, our Triton kernels (``pixelfly_kernels.block_sparse_attention``)
and FlexAttention.

Math (see ``pixelfly_kernels.butterfly_attention``): one softmax over the union of a flat block butterfly pattern
over sequence blocks (+ neighbouring blocks), the first ``n_global_tokens`` positions as global tokens (keys for
everyone; also queries over everything when bidirectional), causality and the padding mask. Decode steps: the query
at absolute position p (= kv_len - q_len + i with a KV cache) attends to exactly the keys allowed for p in a full
forward, so cached and uncached generation agree.

Usage: importing this module registers "pixelfly" (``get_model`` and Pixelfly configs with attention settings do
it); a model then needs ``config.pixelfly_attention = PixelflyAttentionConfig(...).to_dict()`` and
``attn_implementation="pixelfly"``.
"""
from __future__ import annotations

import logging
from functools import lru_cache

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pixelfly_kernels.attention_reference import masked_softmax_attention
from pixelfly_kernels import attention_launch
from pixelfly_kernels.block_sparse_attention import block_sparse_attention
from pixelfly_kernels.butterfly_attention import (
    PatternSpec,
    block_density,
    dense_pattern,
    flex_pixelfly_attention,
    key_padding_from_mask,
)

from ..config import PixelflyAttentionConfig

logger = logging.getLogger(__name__)

ATTENTION_NAME = "pixelfly"
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The smallest block on a GPU, for both paths: our kernels' tiles are up to this many rows, and FlexAttention needs
# BlockMask blocks its GPU tiles divide (64-token blocks fail in backward).
MIN_GPU_BLOCK_SIZE = attention_launch.MIN_BLOCK_SIZE


def pattern_of(config: PixelflyAttentionConfig) -> PatternSpec:
    return PatternSpec(config.block_size, config.butterfly_size, config.n_factors, config.n_global_tokens)


# parsed once per distinct options dict; a plain dict, not lru_cache, which torch.compile warns it traces through
_CONFIGS: dict[tuple, PixelflyAttentionConfig] = {}


def _config_from_items(items: tuple) -> PixelflyAttentionConfig:
    config = _CONFIGS.get(items)
    if config is None:
        config = _CONFIGS[items] = PixelflyAttentionConfig.from_dict(dict(items))
    return config


def settings_of(module: torch.nn.Module) -> PixelflyAttentionConfig:
    """The settings in ``module.config.pixelfly_attention`` (defaults when absent)."""
    options = getattr(getattr(module, "config", None), "pixelfly_attention", None)
    if isinstance(options, PixelflyAttentionConfig):
        return options
    if options is not None and not isinstance(options, dict):
        raise TypeError(
            f"config.pixelfly_attention must be a dict, got {type(options).__name__}; "
            "store PixelflyAttentionConfig(...).to_dict()"
        )
    return _config_from_items(tuple(sorted((options or {}).items())))


def choose_attention(seq_len: int, settings: PixelflyAttentionConfig | None = None, causal: bool = True) -> str:
    """"pixelfly" or "sdpa" for a sequence of ``seq_len`` tokens: dense SDPA where sparse cannot win
    (too short, or tile density above ``max_density_for_sparse``). Depends only on the length and
    the settings, never on the device, so CPU and GPU compute the same function. Logs its choice
    once per (seq_len, settings, causal)."""
    settings = settings or PixelflyAttentionConfig()
    return _choose_attention(seq_len, *pattern_of(settings), settings.min_seq_len_for_sparse,
                             settings.max_density_for_sparse, causal)


# A constant to torch.compile, which calls it once while tracing: neither its pattern arithmetic nor its log line
# end up in (or break) the graph. The cache (it runs on every eager attention call) sits inside, where Dynamo
# does not look: it warns about any lru_cache it traces through.
@torch.compiler.assume_constant_result
def _choose_attention(seq_len: int, block_size: int, butterfly_size: int | None, n_factors: int, n_global: int,
                      min_seq_len_for_sparse: int, max_density_for_sparse: float, causal: bool) -> str:
    return _choose_attention_cached(seq_len, block_size, butterfly_size, n_factors, n_global,
                                    min_seq_len_for_sparse, max_density_for_sparse, causal)


@lru_cache(maxsize=256)
def _choose_attention_cached(seq_len: int, block_size: int, butterfly_size: int | None, n_factors: int,
                             n_global: int, min_seq_len_for_sparse: int, max_density_for_sparse: float,
                             causal: bool) -> str:
    density = block_density(seq_len, PatternSpec(block_size, butterfly_size, n_factors, n_global), causal)
    if seq_len < min_seq_len_for_sparse:
        choice, why = "sdpa", f"shorter than min_seq_len_for_sparse={min_seq_len_for_sparse}"
    elif density > max_density_for_sparse:
        choice, why = "sdpa", f"tile density {density:.2f} > max_density_for_sparse={max_density_for_sparse}"
    else:
        choice, why = "pixelfly", f"tile density {density:.2f}"
    logger.info("pixelfly attention: seq_len=%d causal=%s -> %s (%s)", seq_len, causal, choice, why)
    return choice


def _validate(query, key, value, attention_mask):
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"pixelfly attention expects query/key/value of shape (batch, heads, seq, head_dim), got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    head_dim = query.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS or key.shape[-1] != head_dim or value.shape[-1] != head_dim:
        raise ValueError(
            f"pixelfly attention: head_dim={head_dim} (key {key.shape[-1]}, value {value.shape[-1]}) is "
            f"unsupported; use equal head dims in {SUPPORTED_HEAD_DIMS} or attn_implementation='sdpa'"
        )
    if query.dtype not in SUPPORTED_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            f"pixelfly attention: dtype {query.dtype} (key {key.dtype}, value {value.dtype}) is unsupported; "
            "use float32, float16 or bfloat16 for all of query/key/value"
        )
    if attention_mask is not None:
        b, h, q_len, _ = query.shape
        kv_len = key.shape[2]
        shape = tuple(attention_mask.shape)
        ok = (
            attention_mask.dim() == 4
            and shape[0] in (1, b)
            and shape[1] in (1, h)
            and shape[2] == q_len
            and shape[3] == kv_len
        )
        if not ok:
            raise ValueError(
                f"pixelfly attention: attention_mask of shape {shape} does not fit (batch={b}, heads={h}, "
                f"q_len={q_len}, kv_len={kv_len}); pass a 4-D mask (batch or 1, 1 or heads, {q_len}, {kv_len}) "
                "as built by transformers' mask interface (import pixelfly_hf before creating the model)"
            )


def _as_keep(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """True = may attend. Additive float masks (0 / large negative) are converted."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


_warned: set = set()


def _warn_once(message: str):
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def pixelfly_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q/k/v (B, heads, S, D) -> ((B, S, heads, D), None)."""
    settings = settings_of(module)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len != kv_len and not causal:
        # cross-attention: the pattern relates positions of one sequence, so it has no meaning here
        _warn_once("pixelfly attention: cross-attention (q_len != kv_len, not causal) uses dense SDPA")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if choose_attention(kv_len, settings, causal) == "sdpa":
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    _validate(query, key, value, attention_mask)
    if dropout > 0:
        _warn_once(
            f"pixelfly attention ignores attention dropout p={dropout} (FlexAttention has none); set the "
            "model's attention dropout (attn_pdrop / attention_probs_dropout_prob) to 0.0 to silence this"
        )
    if kwargs.get("output_attentions", False):
        _warn_once("pixelfly attention does not return attention weights (output_attentions is ignored)")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    keep = _as_keep(attention_mask)
    spec = pattern_of(settings)
    if query.is_cuda and q_len == kv_len:
        if settings.block_size < MIN_GPU_BLOCK_SIZE:
            raise ValueError(
                f"pixelfly attention: block_size={settings.block_size} is below {MIN_GPU_BLOCK_SIZE}, the "
                f"smallest block the GPU kernels train with; set block_size={MIN_GPU_BLOCK_SIZE}"
            )
        out = _gpu_pixelfly_attention(query, key, value, spec, causal, scale, keep)
    else:
        out = reference_pixelfly_attention(query, key, value, keep, spec, causal, scale)
    return out.transpose(1, 2).contiguous(), None


def _gpu_pixelfly_attention(query, key, value, spec: PatternSpec, causal: bool, scale: float,
                            keep: torch.Tensor | None) -> torch.Tensor:
    """Our Triton kernels where they apply (global tokens in whole blocks, bf16/fp16, their head dims, no mask or a
    key padding mask), FlexAttention for the rest (fp32, other head dims, general 4-D masks)."""
    if (attention_launch.supports(spec) and query.dtype in attention_launch.DTYPES
            and query.shape[-1] in attention_launch.HEAD_DIMS):
        key_keep = None if keep is None else key_padding_from_mask(keep, causal)
        if keep is None or key_keep is not None:
            return block_sparse_attention(query, key, value, spec, causal, scale, key_keep)
    return flex_pixelfly_attention(query, key, value, spec, causal, scale, keep)


def reference_pixelfly_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor | None,
    spec: PatternSpec,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """PyTorch reference (B, H, S, D) -> (B, H, S, D). With a KV cache (q_len < kv_len, causal) the
    queries are the last q_len positions."""
    q_len, kv_len = query.shape[2], key.shape[2]
    allowed = dense_pattern(q_len, kv_len, spec, causal, device=query.device, q_offset=kv_len - q_len)
    if keep is not None:
        allowed = allowed & keep
    return masked_softmax_attention(query, key, value, allowed, scale)


AttentionInterface.register(ATTENTION_NAME, pixelfly_attention_forward)
# Without a mask function registered under the same name, transformers hands the attention None
# instead of the padding mask. sdpa's boolean (B, 1, Q, KV) mask (None when plainly causal) fits.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
