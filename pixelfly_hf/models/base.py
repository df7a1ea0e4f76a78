"""PixelflyModelMixin, mixed into every Pixelfly model class: the dense model is built, then the Pixelfly plan in
its config (install.py) is installed, before any weight is loaded; summary, merge, save and push with a model card.
"""
from __future__ import annotations

import os
import tempfile

from ..layers import PixelflyLinear
from ..merge import merge_and_unload
from ..summary import format_sparsity_summary, sparsity_summary
from .card import MODEL_CARD_NAME, model_card, picked_rank_note
from .install import install_pixelfly_layers


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
        note = picked_rank_note(self)
        print(format_sparsity_summary(summary) + (f"\n{note}" if note else ""))
        return summary

    def merge_and_unload(self):
        """This model as its stock transformers class, every Pixelfly matrix replaced by its dense S + U V, in place.

        The result loads without pixelfly_hf; Pixelfly attention goes back to the model's default attention.
        See pixelfly_hf.merge for the rules (a trained gate cannot be merged).
        """
        return merge_and_unload(self)

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """transformers' save_pretrained (safetensors + config.json with the plan) plus a model card."""
        result = super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            with open(os.path.join(save_directory, MODEL_CARD_NAME), "w", encoding="utf-8") as f:
                f.write(model_card(self))
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
                f.write(model_card(self, repo_id=repo_id, tags=tags))
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp_dir,
                commit_message=commit_message or "Upload Pixelfly model",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )
