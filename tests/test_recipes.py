"""The GPT-2 accelerate recipe end to end on CPU, offline: train -> save -> reload, bad flags, the time limit, resume
after SIGKILL, and two real CPU processes (DDP over gloo)."""
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers_recipes import RECIPES, ROOT, import_script, read_log, read_results, recipe_env, run_recipe
from pixelfly_hf.training import RecipeError, TrainingLoop, read_checkpoint_state

gpt2_wikitext = import_script(RECIPES / "gpt2_wikitext.py")

SHAKESPEARE = RECIPES / "data" / "shakespeare"
TINY = ["--model_size", "tiny", "--seq_len", "32", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--max_eval_samples", "16", "--logging_steps", "1",
        "--num_warmup_steps", "2"]


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """~12k training tokens and ~3.5k validation tokens of the shipped Shakespeare."""
    d = tmp_path_factory.mktemp("text")
    (d / "train.txt").write_text((SHAKESPEARE / "train.txt").read_text()[:40_000])
    (d / "validation.txt").write_text((SHAKESPEARE / "validation.txt").read_text()[:12_000])
    return ["--train_file", str(d / "train.txt"), "--validation_file", str(d / "validation.txt")]


def eval_loss_of_saved_model(output_dir, text_files, seq_len=32, max_eval_samples=16):
    """Reload the saved folder with AutoModelForCausalLM and score the recipe's validation blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    args = gpt2_wikitext.parse_args([*text_files, "--output_dir", str(output_dir)])
    blocks = gpt2_wikitext.tokenize_and_group(gpt2_wikitext.load_text(args), tokenizer, seq_len, args)
    ids = torch.tensor(blocks["validation"]["input_ids"][:max_eval_samples])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten())
    return model, nll.item()


@pytest.mark.parametrize("dense", [False, True], ids=["pixelfly", "dense"])
def test_gpt2_trains_saves_and_reloads(tmp_path, hf_home, text_files, dense):
    out = tmp_path / "out"
    proc = run_recipe("gpt2_wikitext.py", [*TINY, *text_files, *(["--dense"] if dense else []),
                                           "--max_train_steps", "6", "--output_dir", str(out)], hf_home)
    results = read_results(out)
    assert results["completed_steps"] == 6 and results["pixelfly"] is (not dense)
    assert results["eval_loss"] < results["initial_eval_loss"] - 0.5
    assert math.isclose(results["eval_perplexity"], math.exp(results["eval_loss"]), rel_tol=1e-9)
    assert results["train_tokens_per_second"] > 0
    assert "validation perplexity:" in proc.stdout and f"saved to {out}" in proc.stdout
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    card = (out / "README.md").read_text()
    assert "eval_perplexity" in card and "train_tokens_per_second" in card
    train, evals = read_log(out)
    assert sorted(train) == list(range(1, 7)) and all(r["train/tokens_per_second"] > 0 for r in train.values())
    assert sorted(evals) == [0, 6]
    assert evals[0]["train/seconds"] == 0 and evals[0]["train/tokens"] == 0
    assert evals[6]["train/tokens"] == 6 * 4 * 32 and evals[6]["train/seconds"] > 0
    assert results["stopped_by"] == "steps"
    model, loss = eval_loss_of_saved_model(out, text_files)
    assert loss == pytest.approx(results["eval_loss"], rel=1e-5)
    config = json.loads((out / "config.json").read_text())
    if dense:
        assert config["model_type"] == "gpt2" and "Dense baseline" in card
        assert results["density"] == 1.0
    else:
        from pixelfly_hf import PixelflyLinear

        assert config["model_type"] == "pixelfly_gpt2" and config["pixelfly"]["config"]["density"] == 0.25
        assert sum(isinstance(m, PixelflyLinear) for m in model.modules()) == 16  # attn + mlp of 4 layers
        assert 0 < results["density"] < 0.3 and f"density | {results['density']:.6g} |" in card  # the card's format
        assert "transformer.h.0.mlp.c_fc" in card


def test_gpt2_compare_dense_prints_both_rates_and_leaves_the_run_unchanged(tmp_path, hf_home, text_files):
    """--compare_dense_steps times the dense model before training and reports its rate beside Pixelfly's; the
    Pixelfly run itself (weights, data order, dropout) is the one it would have been without the flag."""
    flags = [*TINY, *text_files, "--max_train_steps", "4", "--logging_steps", "2"]
    run_recipe("gpt2_wikitext.py", [*flags, "--output_dir", str(tmp_path / "plain")], hf_home)
    proc = run_recipe("gpt2_wikitext.py", [*flags, "--compare_dense_steps", "2", "--output_dir",
                                           str(tmp_path / "compared")], hf_home)
    plain, compared = read_results(tmp_path / "plain"), read_results(tmp_path / "compared")
    assert compared["eval_loss"] == plain["eval_loss"] and compared["pixelfly"]
    assert compared["dense_tokens_per_second"] > 0 and "dense_tokens_per_second" not in plain
    assert compared["steady_tokens_per_second"] > 0
    line = next(line for line in proc.stdout.splitlines() if line.startswith("compared with dense:"))
    ratio = compared["steady_tokens_per_second"] / compared["dense_tokens_per_second"]
    assert f"Pixelfly {compared['steady_tokens_per_second']:,.0f} tokens/s" in line
    assert f"timed on 2 steps before training): {ratio:.2f}x dense" in line


def test_gpt2_stops_at_the_time_limit(tmp_path, hf_home, text_files):
    """--max_train_minutes ends a run long before --max_train_steps, at a logging step, with the time and
    token counts in every eval record (what equal-time comparisons plot)."""
    out = tmp_path / "out"
    run_recipe("gpt2_wikitext.py", [*TINY, *text_files, "--dense", "--max_train_steps", "100000",
                                    "--logging_steps", "2", "--eval_steps", "4", "--max_train_minutes", "0.05",
                                    "--lr_scheduler_type", "constant", "--checkpointing_steps", "epoch",
                                    "--output_dir", str(out)], hf_home)
    results = read_results(out)
    assert results["stopped_by"] == "time"
    # the last checkpoint records the position inside its epoch, so resuming continues from there
    state = max((read_checkpoint_state(p) for p in out.glob("epoch_*")), key=lambda s: s["completed_steps"])
    assert state["completed_steps"] == results["completed_steps"] and state["batches_in_epoch"] > 0
    assert state["train_seconds"] == pytest.approx(results["train_seconds"])
    assert results["completed_steps"] % 2 == 0 and 2 <= results["completed_steps"] < 100000
    assert 3.0 <= results["train_seconds"] < 30
    train, evals = read_log(out)
    steps = sorted(evals)
    assert steps[0] == 0 and steps[-1] == results["completed_steps"]
    assert all(evals[s]["train/tokens"] == s * 4 * 32 for s in steps)
    seconds = [evals[s]["train/seconds"] for s in steps]
    assert seconds == sorted(seconds) and seconds[-1] == pytest.approx(results["train_seconds"])


def test_gpt2_epoch_has_only_full_batches(tmp_path, hf_home, text_files):
    """30 blocks at batch 4 make 7 steps per epoch, not 8: a short last batch would make torch.compile
    recompile at every epoch end."""
    out = tmp_path / "out"
    run_recipe("gpt2_wikitext.py", [*TINY, *text_files, "--dense", "--num_train_epochs", "2",
                                    "--max_train_samples", "30", "--output_dir", str(out)], hf_home)
    assert read_results(out)["completed_steps"] == 14


@pytest.mark.parametrize("flags, message", [
    (["--max_train_minutes", "0"], "--max_train_minutes 0.0 must be > 0"),
    (["--density", "1.5"], "--density 1.5 is out of range"),
    (["--density", "0"], "--density 0.0 is out of range"),
    (["--seq_len", "2048"], "--seq_len 2048 does not fit the model: it has 1024 positions"),
    (["--text_column_name", "body"], "--text_column_name 'body' is not a column of the dataset"),
    (["--pixelfly_block_size", "24"], "--pixelfly_block_size 24 is not a power of 2"),
    (["--pixelfly_block_size", "8"], "--pixelfly_block_size 8 is not a power of 2 of at least 16"),  # before the data
    (["--checkpointing_steps", "often"], "--checkpointing_steps 'often'"),
    (["--compare_dense_steps", "-1"], "--compare_dense_steps -1 is negative"),
    (["--compare_dense_steps", "2", "--dense"], "--compare_dense_steps times the dense model beside a Pixelfly run"),
])
def test_gpt2_bad_flags_fail_before_training(tmp_path, text_files, flags, message, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started despite a bad flag")

    monkeypatch.setattr(TrainingLoop, "__init__", no_training)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        gpt2_wikitext.main([*TINY, *text_files, *flags, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_bad_flag_exits_with_a_clear_message(tmp_path, hf_home, text_files):
    proc = run_recipe("gpt2_wikitext.py", [*TINY, *text_files, "--density", "2", "--output_dir", str(tmp_path)],
                      hf_home, check=False)
    assert proc.returncode == 1
    assert "error: --density 2.0 is out of range: give a fraction in (0, 1]" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_gpt2_resume_after_sigkill_matches_uninterrupted_run(tmp_path, hf_home, text_files):
    flags = [*TINY, *text_files, "--max_train_steps", "8", "--checkpointing_steps", "3",
             "--eval_steps", "4", "--dropout", "0.1"]
    reference = tmp_path / "reference"
    run_recipe("gpt2_wikitext.py", [*flags, "--output_dir", str(reference)], hf_home)
    ref_train, ref_evals = read_log(reference)

    # Same run, SIGKILLed once it has logged step 4 (after the step_3 checkpoint, before step_6's).
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(RECIPES / "gpt2_wikitext.py"), *flags, "--output_dir",
                             str(killed)], env=recipe_env(hf_home), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = killed / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if log.is_file() and '"step": 4,' in log.read_text():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "model.safetensors").exists()
    killed_train, _ = read_log(killed)
    checkpoints = sorted(p.name for p in killed.iterdir() if p.name.startswith("step_"))
    assert checkpoints and checkpoints[0] == "step_3"

    proc = run_recipe("gpt2_wikitext.py", [*flags, "--output_dir", str(killed), "--resume_from_checkpoint",
                                           "latest"], hf_home)
    assert f"resumed from {killed / checkpoints[-1]}" in proc.stdout
    resumed_train, resumed_evals = read_log(killed)
    for step, record in [*killed_train.items(), *resumed_train.items()]:
        assert record["train/loss"] == pytest.approx(ref_train[step]["train/loss"], rel=1e-6, abs=1e-6), step
        assert record["train/lr"] == pytest.approx(ref_train[step]["train/lr"]), step
    assert sorted(resumed_train) == list(range(1, 9))
    assert resumed_evals[8]["eval/loss"] == pytest.approx(ref_evals[8]["eval/loss"], rel=1e-6)
    assert read_results(killed)["eval_loss"] == pytest.approx(read_results(reference)["eval_loss"], rel=1e-6)


@pytest.mark.slow
def test_gpt2_two_cpu_processes_match_one(tmp_path, hf_home, text_files):
    """Pixelfly GPT-2 under DDP on two CPU processes (batch 2x4) follows the one-process run with batch 8."""
    flags = [*TINY, *text_files, "--max_train_steps", "4", "--dropout", "0"]
    single, double = tmp_path / "single", tmp_path / "double"
    run_recipe("gpt2_wikitext.py", [*flags, "--per_device_train_batch_size", "8", "--output_dir", str(single)],
               hf_home)
    run_recipe("gpt2_wikitext.py", [*flags, "--per_device_train_batch_size", "4", "--output_dir", str(double)],
               hf_home, processes=2)
    one, two = read_log(single)[0], read_log(double)[0]
    assert sorted(two) == list(range(1, 5))
    for step in one:
        assert two[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-4), step
    r1, r2 = read_results(single), read_results(double)
    assert r2["eval_loss"] == pytest.approx(r1["eval_loss"], rel=1e-4)
    assert r2["initial_eval_loss"] == pytest.approx(r1["initial_eval_loss"], rel=1e-6)
    assert json.loads((double / "config.json").read_text())["model_type"] == "pixelfly_gpt2"


def test_gpt2_time_limit_stops_two_processes_together(tmp_path, hf_home, text_files):
    """Under DDP the time check rides on the logging reduction: both processes stop at the same step (a
    process that stopped alone would leave the other waiting in the next collective until the timeout)."""
    out = tmp_path / "out"
    run_recipe("gpt2_wikitext.py", [*TINY, *text_files, "--max_train_steps", "100000", "--logging_steps", "2",
                                    "--max_train_minutes", "0.05", "--lr_scheduler_type", "constant",
                                    "--output_dir", str(out)], hf_home, processes=2, timeout=300)
    results = read_results(out)
    assert results["stopped_by"] == "time" and 2 <= results["completed_steps"] < 100000
    train, evals = read_log(out)
    assert max(train) == results["completed_steps"] == max(evals)
    assert evals[max(evals)]["train/tokens"] == results["completed_steps"] * 2 * 4 * 32  # 2 processes x batch 4
