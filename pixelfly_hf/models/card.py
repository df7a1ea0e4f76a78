"""The model card (README.md) a Pixelfly model is saved and pushed with."""
from __future__ import annotations

import json
import os

from .registry import auto_class_of, dense_class_of

MODEL_CARD_NAME = "README.md"


def picked_rank_note(model) -> str:
    """The sentence saying that the planner picked the ranks, where the config asked for none ('' otherwise)."""
    if model.config.pixelfly["config"].get("low_rank") is not None:
        return ""
    return ("low_rank was not set, so the planner picked each matrix's rank (the rank column): up to 32, leaving "
            "room for butterfly factors within a density budget.")


def model_card(model, repo_id: str | None = None, tags: list[str] | None = None, sections: str = "") -> str:
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
            f"What this config built is below, per matrix. {picked_rank_note(model)}\n\n"
            "## Replaced matrices\n\n"
            "| module | shape (in->out) | layout | rank | density |\n|---|---|---|---|---|\n"
            f"{rows}\n" + (f"\n{sections}" if sections else "")
        )
    )
