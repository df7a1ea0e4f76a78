"""get_model: turn a GPT-2 / BERT / ViT transformers model into its Pixelfly version, in place; the summary."""
from __future__ import annotations

import logging
import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import OVERRIDE_KEYS, PixelflyConfig
from .layers import PixelflyLinear
from .models import ARCHITECTURES, PixelflyModelMixin, supported_classes
from .models.base import install_pixelfly_layers
from .patterns import plan_matrix

logger = logging.getLogger(__name__)


def _find_architecture(model: nn.Module):
    for arch in ARCHITECTURES:
        if type(model) in arch.models:
            return arch, arch.models[type(model)][0]
    if isinstance(model, PixelflyModelMixin):
        raise ValueError(f"{type(model).__name__} is already a Pixelfly model; call get_model on a dense model.")
    raise ValueError(
        f"get_model does not support {type(model).__name__}; supported model classes: "
        f"{', '.join(supported_classes())}. Adding an architecture means adding one file to pixelfly_hf/models/."
    )


def _matcher(entry: str, arch, what: str):
    """A predicate over (full name, name relative to the base model) for one role or module-name pattern."""
    if entry in arch.roles:
        role = re.compile(arch.roles[entry])
        return lambda full, rel: role.fullmatch(rel) is not None
    try:
        pattern = re.compile(rf"(?:.*\.)?(?:{entry})")
    except re.error as err:
        raise ValueError(f"{what} entry {entry!r} is neither a role {sorted(arch.roles)} nor a valid regex: {err}") from None
    return lambda full, rel: pattern.fullmatch(full) is not None


def _select(spec, candidates: dict[str, str], arch, what: str) -> set[str]:
    """Base-relative names of the candidate matrices chosen by target_modules / exclude_modules."""
    if isinstance(spec, str):
        try:
            regex = re.compile(spec)
        except re.error as err:
            raise ValueError(f"{what}={spec!r} is not a valid regex: {err}") from None
        chosen = {rel for rel, full in candidates.items() if regex.fullmatch(full)}
        if not chosen:
            raise ValueError(f"{what}={spec!r} matches no replaceable matrix; e.g. {_examples(candidates)}.")
        return chosen
    chosen = set()
    for entry in spec:
        match = _matcher(entry, arch, what)
        hits = {rel for rel, full in candidates.items() if match(full, rel)}
        if not hits:
            raise ValueError(
                f"{what} entry {entry!r} matches no replaceable matrix of this {arch.name} model; use a role "
                f"{sorted(arch.roles)} or a module name such as {_examples(candidates)}."
            )
        chosen |= hits
    return chosen


def _examples(candidates: dict[str, str]) -> str:
    return ", ".join(repr(full) for full in list(candidates.values())[:4])


def resolve_plan(model: nn.Module, config: PixelflyConfig) -> dict[str, dict]:
    """The per-matrix structure {base-relative name: {in/out_features, butterfly_size, n_factors, rank, ...}}."""
    arch, _ = _find_architecture(model)
    base = model.base_model
    prefix = "" if base is model else model.base_model_prefix + "."
    candidates = {
        rel: prefix + rel for rel, module in base.named_modules() if isinstance(module, (nn.Linear, Conv1D)) and rel
    }
    targets = _select(config.target_modules, candidates, arch, "target_modules")
    if config.exclude_modules is not None:
        targets -= _select(config.exclude_modules, candidates, arch, "exclude_modules")
    if not targets:
        raise ValueError("exclude_modules removes every matrix chosen by target_modules: nothing to replace.")
    overrides = [(key, _matcher(key, arch, "overrides"), values) for key, values in config.overrides.items()]
    for key, match, _ in overrides:
        if not any(match(candidates[rel], rel) for rel in targets):
            raise ValueError(f"overrides key {key!r} matches none of the replaced matrices; check the name or role.")

    plan = {}
    for rel in (name for name in candidates if name in targets):  # model order
        settings = {key: getattr(config, key) for key in OVERRIDE_KEYS}
        for _, match, values in overrides:
            if match(candidates[rel], rel):
                if "density" in values:
                    settings.update(butterfly_size=None, n_factors=None)
                if "butterfly_size" in values or "n_factors" in values:
                    settings.update(density=None)
                settings.update(values)
        out_features, in_features = _shape(base.get_submodule(rel))
        rank = min(settings["low_rank"], out_features, in_features)
        try:
            if settings["density"] is not None:
                chosen = plan_matrix(
                    out_features, in_features, settings["density"], block_size=settings["block_size"], rank=rank
                )
                bs, k, rank = chosen.butterfly_size, chosen.n_factors, chosen.rank
            else:
                bs, k = settings["butterfly_size"], settings["n_factors"]
            # validates the layout and rank for this shape
            PixelflyLinear(in_features, out_features, butterfly_size=bs, n_factors=k, rank=rank,
                           block_size=settings["block_size"], device="meta")
        except ValueError as err:
            raise ValueError(f"{candidates[rel]} ({in_features}->{out_features}): {err}") from None
        plan[rel] = {
            "in_features": in_features, "out_features": out_features, "butterfly_size": bs, "n_factors": k,
            "rank": rank, "block_size": settings["block_size"], "gate": settings["gate"],
        }
    return plan


def _shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a Conv1D (which stores its weight as in x out)."""
    if isinstance(module, Conv1D):
        return module.nf, module.nx
    return module.out_features, module.in_features


def _pixelfly_model_config(arch, old_config, plan: dict, config: PixelflyConfig):
    values = old_config.to_dict()
    for key in ("model_type", "transformers_version", "auto_map"):
        values.pop(key, None)
    new_config = arch.config_class(
        **values,
        pixelfly={"config": config.to_dict(), "base_model": old_config.name_or_path or None, "modules": plan},
        attn_implementation=old_config._attn_implementation,
    )
    new_config.name_or_path = old_config.name_or_path
    return new_config


def get_model(model: nn.Module, config: PixelflyConfig) -> nn.Module:
    """Replace the matrices chosen by `config` with PixelflyLinear, in place, and return the model.

    The model becomes the registered Pixelfly class (e.g. PixelflyGPT2LMHeadModel) with a config of its own
    model_type carrying the resolved plan, so save_pretrained / push_to_hub / Auto*.from_pretrained round-trip.
    init="project" fits each dense matrix (errors in each layer's `projection_error`); "random" re-initialises.
    """
    if not isinstance(config, PixelflyConfig):
        raise TypeError(f"config must be a PixelflyConfig, got {type(config).__name__}")
    config.validate()
    arch, pixelfly_class = _find_architecture(model)
    plan = resolve_plan(model, config)
    attention_settings = None
    if config.attention == "pixelfly":
        from .attention import AttentionSettings

        attention_settings = AttentionSettings.from_dict(config.attention_config).to_dict()
    install_pixelfly_layers(model.base_model, plan, project=config.init == "project", n_iter=config.projection_iters)

    old_config = model.config
    new_config = _pixelfly_model_config(arch, old_config, plan, config)
    for module in model.modules():
        if getattr(module, "config", None) is old_config:
            module.config = new_config
    model.__class__ = pixelfly_class
    if attention_settings is not None:
        new_config.pixelfly_attention = attention_settings
        model.set_attn_implementation("pixelfly")
    for name, spec in plan.items():
        logger.info("pixelfly %s: %s", name, spec)
    return model


def sparsity_summary(model: nn.Module) -> dict:
    """Params and matrix FLOPs per token, dense vs Pixelfly, for the whole model and per replaced matrix."""
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, PixelflyLinear):
            continue
        dense = module.num_params_dense
        ours = module.num_params_structured + (module.gate.weight.numel() if module.gate is not None else 0)
        layers.append({
            "name": name,
            "in_features": module.in_features,
            "out_features": module.out_features,
            "layout": module.layout.describe(),
            "butterfly_size": module.butterfly_size,
            "n_factors": module.n_factors,
            "rank": module.rank,
            "density": ours / dense,
            "params_dense": dense,
            "params_pixelfly": ours,
            "flops_per_token_dense": 2 * dense,
            "flops_per_token_pixelfly": 2 * ours,
            "flops_per_token_saved": 2 * (dense - ours),
            "projection_error": module.projection_error,
        })
    total = sum(p.numel() for p in model.parameters())
    matrices_dense = sum(row["params_dense"] for row in layers)
    matrices_ours = sum(row["params_pixelfly"] for row in layers)
    return {
        "layers": layers,
        "replaced_matrices": len(layers),
        "matrix_params_dense": matrices_dense,
        "matrix_params_pixelfly": matrices_ours,
        "density": matrices_ours / matrices_dense if matrices_dense else 1.0,
        "total_params_dense": total - matrices_ours + matrices_dense,
        "total_params_pixelfly": total,
        "total_density": total / (total - matrices_ours + matrices_dense),
        "flops_per_token_dense": 2 * matrices_dense,
        "flops_per_token_pixelfly": 2 * matrices_ours,
        "flops_per_token_saved": 2 * (matrices_dense - matrices_ours),
    }


def format_sparsity_summary(summary: dict) -> str:
    header = f"{'module':<44} {'in->out':>11} {'bs':>3} {'k':>2} {'rank':>4} {'density':>8} {'params':>19} {'MFLOP/tok saved':>15}"
    lines = [header, "-" * len(header)]
    for row in summary["layers"]:
        lines.append(
            f"{row['name']:<44} {row['in_features']:>5}->{row['out_features']:<5} {row['butterfly_size']:>3} "
            f"{row['n_factors']:>2} {row['rank']:>4} {row['density']:>8.2%} "
            f"{row['params_pixelfly']:>9,}/{row['params_dense']:<9,} {row['flops_per_token_saved'] / 1e6:>15.3f}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"{summary['replaced_matrices']} matrices replaced: {summary['matrix_params_pixelfly']:,} of "
        f"{summary['matrix_params_dense']:,} params ({summary['density']:.2%}); whole model "
        f"{summary['total_params_pixelfly']:,} vs {summary['total_params_dense']:,} dense "
        f"({summary['total_density']:.2%}); matrix FLOPs per token {summary['flops_per_token_pixelfly']:,} vs "
        f"{summary['flops_per_token_dense']:,} dense, {summary['flops_per_token_saved']:,} saved."
    )
    return "\n".join(lines)
