"""Shared machinery of the Pixelfly model classes: the architecture registry and the model mixin.

An architecture file (gpt2.py, bert.py, vit.py) declares one Pixelfly model class per supported transformers
class, over its Pixelfly config class from configs.py, and which module names play which role, then calls
`register_architecture`.

A Pixelfly model's config carries `pixelfly = {"config": <PixelflyConfig dict>, "base_model": <id or path>,
"modules": {name: {in_features, out_features, butterfly_size, n_factors, rank, block_size, gate}}}`, module
names relative to the base model (`model.base_model`), so every head class of one architecture shares it.
The model classes build the dense transformers model, then swap each planned matrix for a PixelflyLinear of
the planned shape, before any weight is loaded.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

from torch import nn

from ..layers import PixelflyLinear, dense_weight_of
from ..summary import format_sparsity_summary, sparsity_summary

MODEL_CARD_NAME = "README.md"


@dataclass(frozen=True)
class Architecture:
    """One supported model family.

    roles: role name ("attn", "mlp") -> regex that fully matches the names, relative to the base model, of the
    matrices playing that role. models: transformers class -> (Pixelfly subclass, Auto class it registers with).
    """

    name: str
    config_class: type
    roles: dict[str, str]
    models: dict[type, tuple[type, type]]


ARCHITECTURES: list[Architecture] = []


def register_architecture(arch: Architecture) -> None:
    """Make the architecture's Pixelfly classes loadable through the Auto classes once pixelfly_hf is imported
    (configs.py registers the config class).

    No register_for_auto_class: that would make save_pretrained copy this package's source into the checkpoint
    and write an auto_map, i.e. ask every loader to run remote code. Loading needs `import pixelfly_hf` instead.
    """
    for pixelfly_class, auto_class in arch.models.values():
        auto_class.register(arch.config_class, pixelfly_class, exist_ok=True)
    ARCHITECTURES.append(arch)


def supported_classes() -> list[str]:
    return [cls.__name__ for arch in ARCHITECTURES for cls in arch.models]


def dense_class_of(pixelfly_class: type) -> type:
    """The transformers class a Pixelfly model class patches."""
    return next(cls for arch in ARCHITECTURES for cls, (ours, _) in arch.models.items() if ours is pixelfly_class)


def auto_class_of(pixelfly_class: type) -> type:
    """The Auto class (e.g. AutoModelForCausalLM) a Pixelfly model class is registered with."""
    return next(auto for arch in ARCHITECTURES for ours, auto in arch.models.values() if ours is pixelfly_class)


def install_pixelfly_layers(root: nn.Module, modules: dict[str, dict], *, project: bool, n_iter: int = 3,
                            input_covariances: dict | None = None) -> None:
    """Replace each planned nn.Linear / Conv1D under `root` with a PixelflyLinear of the planned structure.

    project=True fits the dense weights, or with `input_covariances` (name -> E[x x^T], calibration.py) the
    outputs on those inputs (the fit's error lands in each layer's `.projection_error`); otherwise
    the layer is built on the dense weight's device and dtype with its own random init (on the meta device
    while transformers builds a model to load weights into).
    """
    for name, spec in modules.items():
        parent_name, _, child = name.rpartition(".")
        try:
            dense = root.get_submodule(name)
            weight = dense_weight_of(dense)
        except (AttributeError, TypeError) as err:
            raise ValueError(
                f"the Pixelfly plan names module {name!r}, but the model has no nn.Linear/Conv1D there ({err}); "
                "the config's pixelfly['modules'] does not belong to this model."
            ) from None
        shape = (spec["out_features"], spec["in_features"])
        if tuple(weight.shape) != shape:
            raise ValueError(
                f"the Pixelfly plan for {name!r} is {shape[1]}->{shape[0]} but the model's matrix is "
                f"{weight.shape[1]}->{weight.shape[0]}; the config's pixelfly['modules'] does not fit this model."
            )
        structure = {key: spec[key] for key in ("butterfly_size", "n_factors", "rank", "block_size", "gate")}
        if project:
            layer = PixelflyLinear.from_dense(dense, n_iter=n_iter, input_covariance=(input_covariances or {}).get(name),
                                              **structure)
        else:
            layer = PixelflyLinear(
                shape[1], shape[0], bias=dense.bias is not None, device=weight.device, dtype=weight.dtype, **structure
            )
        setattr(root.get_submodule(parent_name) if parent_name else root, child, layer)


def _picked_rank_note(model) -> str:
    """The sentence saying that the planner picked the ranks, where the config asked for none ('' otherwise)."""
    if model.config.pixelfly["config"].get("low_rank") is not None:
        return ""
    return ("low_rank was not set, so the planner picked each matrix's rank (the rank column): up to 32, leaving "
            "room for butterfly factors within a density budget.")


def _model_card(model, repo_id: str | None = None, tags: list[str] | None = None, sections: str = "") -> str:
    """The model card of a Pixelfly model; `sections` (markdown, e.g. a training recipe's results) goes last."""
    from huggingface_hub import ModelCard, ModelCardData

    plan = model.config.pixelfly
    base = plan.get("base_model") or None
    summary = model.sparsity_summary()
    auto_class = auto_class_of(type(model)).__name__
    card_data = ModelCardData(
        library_name="transformers",
        base_model=base if base and not os.path.isabs(base) and not os.path.exists(base) else None,
        tags=["pixelfly", "butterfly-sparse", "low-rank", model.config.model_type, *(tags or [])],
    )
    rows = "\n".join(
        f"| `{row['name']}` | {row['in_features']}->{row['out_features']} | {row['layout']} | {row['rank']} | "
        f"{row['density']:.2%} |"
        for row in summary["layers"]
    )
    return str(
        ModelCard(
            f"---\n{card_data.to_yaml()}\n---\n\n"
            f"# Pixelfly {dense_class_of(type(model)).__name__}" + (f" from `{base}`" if base else "") + "\n\n"
            "The dense matrices listed below were replaced by Pixelfly structure (a flat block butterfly sparse "
            "matrix plus a low-rank term; Dao et al., *Pixelated Butterfly*, ICLR 2022) by the pixelfly_hf "
            "package. "
            f"Replaced matrices hold {summary['density']:.2%} of their dense parameters; the whole model has "
            f"{summary['total_params_pixelfly']:,} parameters ({summary['total_params_dense']:,} dense), and saves "
            f"{summary['flops_per_token_saved']:,} matrix FLOPs per token.\n\n"
            "## How to load\n\n"
            "```python\n"
            "import pixelfly_hf  # registers the Pixelfly model types with the Auto classes\n"
            f"from transformers import {auto_class}\n\n"
            f'model = {auto_class}.from_pretrained("{repo_id or "<this repo id or folder>"}")\n'
            "```\n\n"
            "Weights are safetensors; loading needs neither pickle nor `trust_remote_code`, but it needs "
            "`import pixelfly_hf` (without it transformers does not know the model type "
            f"`{model.config.model_type}`). `model.merge_and_unload()` gives the stock transformers model with "
            "dense weights, which loads without pixelfly_hf.\n\n"
            "## Pixelfly config\n\n"
            f"```json\n{json.dumps(plan['config'], indent=2, sort_keys=True)}\n```\n\n"
            f"What this config built is below, per matrix. {_picked_rank_note(model)}\n\n"
            "## Replaced matrices\n\n"
            "| module | shape (in->out) | layout | rank | density |\n|---|---|---|---|---|\n"
            f"{rows}\n" + (f"\n{sections}" if sections else "")
        )
    )


class PixelflyModelMixin:
    """Mixed in before the transformers model class: builds the dense model, then installs the Pixelfly plan.

    default_loss_type: the transformers loss (a LOSS_MAPPING key) of a class whose name names none (GPT2LMHeadModel,
    so its Pixelfly subclass too). Without it transformers warns "loss_type=None ... unrecognized" on each forward
    with labels, a logging call that also splits every torch.compile graph there.
    """

    default_loss_type: str | None = None

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.name_default_loss()
        modules = (getattr(config, "pixelfly", None) or {}).get("modules")
        if not modules:
            raise ValueError(
                f"{type(self).__name__} needs config.pixelfly['modules'], the per-module plan written by "
                "pixelfly_hf.get_model; build a Pixelfly model with get_model(model, PixelflyConfig(...)) or load "
                "a saved one with from_pretrained."
            )
        install_pixelfly_layers(self.base_model, modules, project=False)

    def name_default_loss(self) -> None:
        """Set `loss_type` to default_loss_type where transformers found none (at init, or after get_model)."""
        if self.default_loss_type and getattr(self, "loss_type", None) is None:
            self.loss_type = self.default_loss_type

    @classmethod
    def _finalize_model_loading(cls, model, load_config, loading_info):
        """Refuse to load a checkpoint whose Pixelfly weights are missing or mis-shaped (never random-init them)."""
        expected = {
            f"{name}.{param}"
            for name, module in model.named_modules()
            if isinstance(module, PixelflyLinear)
            for param, _ in module.named_parameters()
        }
        missing = sorted(key for key in loading_info.missing_keys if key in expected)
        mismatched = sorted(
            f"{key}: checkpoint {tuple(ckpt)} vs model {tuple(ours)}"
            for key, ckpt, ours in loading_info.mismatched_keys
            if key in expected
        )
        if missing or mismatched:
            problems = [f"missing: {key}" for key in missing[:10]] + [f"mis-shaped: {line}" for line in mismatched[:10]]
            more = len(missing) + len(mismatched) - len(problems)
            raise RuntimeError(
                f"cannot load {load_config.pretrained_model_name_or_path!r} into {cls.__name__}: "
                f"{len(missing)} Pixelfly weight(s) missing and {len(mismatched)} mis-shaped in the checkpoint "
                "(they would otherwise be randomly initialised):\n  " + "\n  ".join(problems)
                + (f"\n  ... and {more} more" if more > 0 else "")
                + "\nThe checkpoint's weights do not match the plan in its config.json (config.pixelfly['modules']);"
                " save the model again with save_pretrained, or re-create it with get_model."
            )
        return super()._finalize_model_loading(model, load_config, loading_info)

    def sparsity_summary(self) -> dict:
        return sparsity_summary(self)

    def print_sparsity_summary(self) -> dict:
        """Print per replaced matrix: shape, layout, density, params and FLOPs saved; return the numbers as a dict."""
        summary = self.sparsity_summary()
        note = _picked_rank_note(self)
        print(format_sparsity_summary(summary) + (f"\n{note}" if note else ""))
        return summary

    def merge_and_unload(self):
        """This model as its stock transformers class, every Pixelfly matrix replaced by its dense S + U V, in place.

        The result loads without pixelfly_hf; Pixelfly attention goes back to the model's default attention.
        See pixelfly_hf.merge for the rules (a trained gate cannot be merged).
        """
        from ..merge import merge_and_unload

        return merge_and_unload(self)

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """transformers' save_pretrained (safetensors + config.json with the plan) plus a model card."""
        result = super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            with open(os.path.join(save_directory, MODEL_CARD_NAME), "w", encoding="utf-8") as f:
                f.write(_model_card(self))
        return result

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ):
        """Upload the model with its Pixelfly model card (transformers' own push would overwrite the card)."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
            with open(os.path.join(tmp_dir, MODEL_CARD_NAME), "w", encoding="utf-8") as f:
                f.write(_model_card(self, repo_id=repo_id, tags=tags))
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp_dir,
                commit_message=commit_message or "Upload Pixelfly model",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )
