"""The training-step ratios the README's status table states are the ones their result files hold (recomputed here
from benchmarks/results, so a re-measured file and the README cannot drift apart)."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def step_ms(path: str) -> dict:
    """{(model or row, variant, mode): step ms} of a bench_e2e result file (both of its JSON layouts)."""
    rows = json.loads((RESULTS / path).read_text())["results"]
    return {(r.get("row") or r["model"], r["variant"], r["mode"]): r["step_ms"] for r in rows if r.get("status") == "ok"}


def ratio(path: str, model: str, mode: str) -> float:
    """Dense over Pixelfly step time, both run in `mode`."""
    times = step_ms(path)
    return times[(model, "dense", mode)] / times[(model, "pixelfly", mode)]


MEDIUM = "bench_e2e_medium_compile_cudagraphs_h200_2026-11-29.json"
SMALL = "bench_e2e_small_cudagraphs_h200_2026-11-29.json"
H100 = "bench_e2e_h100_2026-12-06.json"
# README status row (its first cell) -> the ratios its last cell states, in order
ROWS = {
    "GPT-2 medium training step, CUDA graphs": [(MEDIUM, "medium", "cudagraphs")],
    "GPT-2 medium training step, compiled without CUDA graphs": [(MEDIUM, "medium", "compile")],
    "GPT-2 small training step, CUDA graphs": [(SMALL, "small", "cudagraphs")],
    "BERT-base MLM / ViT-B/16 training step, compiled (H100)": [(H100, "bert-base:32x512", "compile"),
                                                               (H100, "vit-base:128x224", "compile")],
}


def status_cells(label: str) -> list[float]:
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(f"| {label} |"))
    return [float(x) for x in re.findall(r"(\d+\.\d+)×", line.split("|")[-2])]


@pytest.mark.parametrize("label", list(ROWS))
def test_readme_status_rows_state_their_result_files(label):
    assert status_cells(label) == [round(ratio(*source), 2) for source in ROWS[label]]


def test_readme_end_to_end_range_spans_the_best_mode_rows():
    """'a training step is **A–B× compiled dense** today, each model in its best mode': the lowest and highest
    ratio of the rows run in their best mode (all but GPT-2 medium without CUDA graphs)."""
    best_mode = [value for label in ROWS if "without CUDA graphs" not in label for value in status_cells(label)]
    stated = re.search(r"a training step is \*\*(\d+\.\d+)–(\d+\.\d+)× compiled dense\*\*",
                       (ROOT / "README.md").read_text())
    assert stated and (float(stated.group(1)), float(stated.group(2))) == (min(best_mode), max(best_mode))
