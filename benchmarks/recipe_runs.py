"""A recipe run as a user runs it (`accelerate launch`, one process), for the studies that compare arms of one
recipe (quality_equal_time.py, finetune_recovery.py), and the train_log.jsonl it writes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"


def launch_recipe(recipe: str, output_dir: Path, flags: list[str], *, cpu: bool) -> None:
    """recipes/<recipe> under `accelerate launch`: bf16 on a GPU (the recipe's default compilation), fp32 with
    --cpu."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    launch += ["--cpu", "--mixed_precision", "no"] if cpu else ["--mixed_precision", "bf16"]
    cmd = [*launch, str(RECIPES / recipe), "--output_dir", str(output_dir), *flags]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def read_log(path: Path) -> list[dict]:
    """The records of a recipe's train_log.jsonl: train windows (train/loss) and evaluations (eval/...)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
