"""get_model: turn a GPT-2 / BERT / ViT transformers model into its Pixelfly version, in place.

Imports the model registry (models/), never the reverse.
"""
from __future__ import annotations

import logging
import re
import warnings

from torch import nn
from transformers.pytorch_utils import Conv1D

from .calibration import project_calibrated
from .config import OVERRIDE_KEYS, PixelflyConfig
from .models import import_architectures
from .models.base import PixelflyModelMixin
from .models.install import install_pixelfly_layers
from .models.registry import ARCHITECTURES, supported_classes
from .patterns import DEFAULT_RANK, FlatButterflyLayout, plan_matrix, validate_rank

import_architectures()
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

    settings_by_name = {}
    for rel in (name for name in candidates if name in targets):  # model order
        settings = {key: getattr(config, key) for key in OVERRIDE_KEYS}
        for _, match, values in overrides:
            if match(candidates[rel], rel):
                if "density" in values:
                    settings.update(butterfly_size=None, n_factors=None)
                if "butterfly_size" in values or "n_factors" in values:
                    settings.update(density=None)
                settings.update(values)
        settings_by_name[rel] = settings
    # matrices of one shape and settings get one plan, so a warning about them is given once, naming them all
    groups: dict[tuple, list[str]] = {}
    for rel, settings in settings_by_name.items():
        groups.setdefault((_shape(base.get_submodule(rel)), tuple(sorted(settings.items()))), []).append(rel)
    plan = {}
    for ((out_features, in_features), items), names in groups.items():
        settings = dict(items)
        structure = _structure(_names(names, candidates), candidates[names[0]], out_features, in_features, settings)
        for rel in names:
            plan[rel] = dict(structure)
    return {rel: plan[rel] for rel in settings_by_name}


def _names(names: list[str], candidates: dict[str, str]) -> str:
    shown = ", ".join(candidates[rel] for rel in names[:2])
    return shown if len(names) <= 2 else f"{shown} and {len(names) - 2} more"


def _structure(what: str, first: str, out_features: int, in_features: int, settings: dict) -> dict:
    """The plan entry of the matrices named `what`: warns when the requested rank cannot be kept, and an error
    names the `first` of them."""
    rank = settings["low_rank"]
    if rank is not None and rank > min(out_features, in_features):
        warnings.warn(
            f"{what} ({in_features}->{out_features}): low_rank={rank} exceeds min(in, out) = "
            f"{min(out_features, in_features)}; using rank {min(out_features, in_features)} (a full-rank term). "
            f"Pass low_rank <= {min(out_features, in_features)} or an override for these matrices to silence this.",
            UserWarning,
            stacklevel=4,
        )
        rank = min(out_features, in_features)
    try:
        if settings["density"] is not None:
            with warnings.catch_warnings(record=True) as lowered:
                warnings.simplefilter("always")
                chosen = plan_matrix(out_features, in_features, settings["density"], block_size=settings["block_size"],
                                     rank=rank, name=f"{what} ({in_features}->{out_features})")
            for warning in lowered:  # said where the user called get_model, not inside this module
                warnings.warn(warning.message, warning.category, stacklevel=4)
            bs, k, rank = chosen.butterfly_size, chosen.n_factors, chosen.rank
        else:
            bs, k = settings["butterfly_size"], settings["n_factors"]
            if rank is None:  # an explicit layout has no budget to fit: the paper's rank
                rank = min(DEFAULT_RANK, out_features, in_features)
        # the shape-dependent checks (divisibility, tile width, rank), before any layer is built
        FlatButterflyLayout(out_features, in_features, bs, k, settings["block_size"])
        validate_rank(rank, out_features, in_features)
    except ValueError as err:
        raise ValueError(f"{first} ({in_features}->{out_features}): {err}") from None
    return {
        "in_features": in_features, "out_features": out_features, "butterfly_size": bs, "n_factors": k,
        "rank": rank, "block_size": settings["block_size"], "gate": settings["gate"],
    }


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


def get_model(model: nn.Module, config: PixelflyConfig, calibration_data=None) -> nn.Module:
    """Replace the matrices chosen by `config` with PixelflyLinear, in place, and return the model.

    The model becomes the registered Pixelfly class (e.g. PixelflyGPT2LMHeadModel) with a config of its own
    model_type carrying the resolved plan, so save_pretrained / push_to_hub / Auto*.from_pretrained round-trip.
    init="project" fits each dense matrix (errors in each layer's `projection_error`); "random" re-initialises.

    calibration_data: with init="project", a few batches of the model's inputs (dicts of keyword inputs, e.g. from
    your DataLoader, or input tensors). Each matrix is then fitted to reproduce its outputs on the inputs these
    batches send it, rather than its weights, in forward order so that each matrix makes up for the error of those
    before it (calibration.py); `projection_error` is then the relative output error. A few thousand tokens are
    enough for 768-wide inputs.
    """
    if not isinstance(config, PixelflyConfig):
        raise TypeError(f"config must be a PixelflyConfig, got {type(config).__name__}")
    config.validate()
    if calibration_data is not None and config.init != "project":
        raise ValueError(f"calibration_data fits projected weights, but config.init={config.init!r}; use "
                         "PixelflyConfig(init='project') or leave calibration_data out")
    arch, pixelfly_class = _find_architecture(model)
    plan = resolve_plan(model, config)
    if calibration_data is None:
        install_pixelfly_layers(model.base_model, plan, project=config.init == "project", n_iter=config.projection_iters)
    else:
        project_calibrated(model, model.base_model, plan, calibration_data, n_iter=config.projection_iters)

    old_config = model.config
    new_config = _pixelfly_model_config(arch, old_config, plan, config)
    for module in model.modules():
        if getattr(module, "config", None) is old_config:
            module.config = new_config
    model.__class__ = pixelfly_class
    model.name_default_loss()
    if config.attention == "pixelfly":
        from .layers import attention  # noqa: F401  (registers "pixelfly" with transformers)

        new_config.pixelfly_attention = config.attention_config.to_dict()
        model.set_attn_implementation("pixelfly")
    for name, spec in plan.items():
        logger.info("pixelfly %s: %s", name, spec)
    return model
