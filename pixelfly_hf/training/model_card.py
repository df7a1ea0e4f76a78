"""The model card (README.md) of a training run's output: the library's Pixelfly card, or a dense one, then how the
model was trained, its results and every flag."""
import json
from pathlib import Path

from ..models.card import model_card

# on args, but no flag: the config built from the Pixelfly flags, which the card shows as those flags
NOT_FLAGS = ("hub_token", "pixelfly_config")


def write_model_card(model, args, result, results, *, recipe, base, dataset, model_class, tags):
    """README.md in output_dir (main process only). result: the training loop's; results: all_results.json's."""
    if result["densified_at"] is not None:
        how = (f"Pixelfly {base}, trained for {result['densified_at']} steps, then merged into dense matrices "
               f"(`--densify_at {args.densify_at}`) and trained dense for the remaining steps,")
    else:
        how = f"{'Dense baseline' if args.dense else 'Pixelfly'} {base}, trained"
    flags = {k: (v.value if hasattr(v, "value") else v) for k, v in sorted(vars(args).items()) if k not in NOT_FLAGS}
    sections = "\n".join([
        "## Training", "", f"{how} with the pixelfly_hf recipe `recipes/{recipe}` on {dataset}.", "",
        "## Results", "", "| metric | value |", "|---|---|",
        *(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()), "",
        "## Training flags", "", "```json", json.dumps(flags, indent=2, default=str), "```", ""])
    if hasattr(model, "sparsity_summary"):
        card = model_card(model, repo_id=args.hub_model_id, tags=tags, sections=sections)
    else:
        card = "\n".join(["---", "library_name: transformers", "tags:", *(f"- {t}" for t in tags), "---", "",
                          f"# {Path(args.output_dir).name}", "", f"A dense {type(model).__name__} (no Pixelfly "
                          "matrices): it loads with transformers alone.", "", "```python",
                          f"from transformers import {model_class}", "",
                          f"model = {model_class}.from_pretrained({str(args.hub_model_id or args.output_dir)!r})",
                          "```", "", sections])
    (Path(args.output_dir) / "README.md").write_text(card)
