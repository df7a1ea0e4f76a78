"""pixelfly_hf.training on its own, in this process, without a recipe: the flags and the PixelflyConfig built from
them, the time budget, the densify schedule and the switch itself, atomic checkpoints, the train log, the compile
choice, and TrainingLoop on a toy model (a time-limited stop, and a resume equal to the uninterrupted run)."""
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from pixelfly_hf.training import (ArgumentParser, DensifySchedule, RecipeError, TimeBudget, TrainingLoop, TrainLog,
                                  add_pixelfly_args, add_training_args, check_args, compile_plugin, densify,
                                  find_checkpoint, make_accelerator, make_optimizer, make_scheduler,
                                  read_checkpoint_state, save_checkpoint)


def parse(argv, *, output_dir, pretrained=False):
    """The shared flags as a script parses and checks them."""
    parser = ArgumentParser("a training script")
    add_pixelfly_args(parser)
    add_training_args(parser, output_dir=str(output_dir))
    args = parser.parse_args(argv)
    check_args(args, pretrained=pretrained)
    return args


@pytest.mark.parametrize("flags, message", [
    (["--density", "1.5"], "--density 1.5 is out of range: give a fraction in (0, 1], e.g. --density 0.25"),
    (["--low_rank", "-1"], "--low_rank -1 is negative: give 0 (no low-rank term) or a rank like 32"),
    (["--pixelfly_block_size", "24"], "--pixelfly_block_size 24 is not a power of 2 of at least 16: use 16, 32"),
    # a power of 2 below the kernel's smallest tile: refused here too, not only once the model is built
    (["--pixelfly_block_size", "8"], "--pixelfly_block_size 8 is not a power of 2 of at least 16: use 16, 32"),
    (["--target_modules", ""], "the Pixelfly flags are not valid: target_modules=[''] must be a non-empty list"),
])
def test_a_pixelfly_flag_that_pixelfly_config_refuses_is_one_error_naming_the_flag(tmp_path, flags, message):
    with pytest.raises(RecipeError) as error:
        parse(flags, output_dir=tmp_path)
    assert str(error.value).startswith(message), str(error.value)


def test_the_pixelfly_flags_become_the_pixelfly_config(tmp_path):
    args = parse(["--density", "0.5", "--low_rank", "8", "--pixelfly_block_size", "16", "--target_modules", "mlp"],
                 output_dir=tmp_path)
    config = args.pixelfly_config
    assert (config.density, config.low_rank, config.block_size, config.target_modules, config.init) == (
        0.5, 8, 16, ["mlp"], "random")
    assert parse([], output_dir=tmp_path, pretrained=True).pixelfly_config.init == "project"
    assert parse(["--dense", "--density", "7"], output_dir=tmp_path).pixelfly_config is None  # no Pixelfly, no check


def test_time_budget_counts_only_while_its_clock_runs():
    budget = TimeBudget(minutes=0.002, spent=0.05)  # 0.12 s, of which a checkpoint had spent 0.05 s
    budget.start()
    time.sleep(0.03)
    elapsed = budget.stop()
    time.sleep(0.1)  # evaluation, say: not counted
    assert 0.03 <= elapsed < 0.09 and budget.spent == pytest.approx(0.05 + elapsed)
    assert not budget.exhausted
    budget.start()
    time.sleep(0.06)
    budget.stop()
    assert budget.exhausted
    assert TimeBudget().limit == float("inf") and not TimeBudget(spent=1e9).exhausted


def test_densify_schedule_comes_at_the_step_or_time_fraction():
    budget = TimeBudget(minutes=2)
    schedule = DensifySchedule(0.5, 10, budget)
    assert schedule.step == 5 and schedule.seconds == 60
    assert not schedule.time_reached(59.9) and schedule.time_reached(60)
    # at least one step sparse and one dense, whatever the fraction
    assert DensifySchedule(0.01, 10, budget).step == 1 and DensifySchedule(0.99, 10, budget).step == 9
    never = DensifySchedule(None, 10, budget)
    assert never.step is None and not never.time_reached(1e9)
    assert not DensifySchedule(0.5, 10, TimeBudget()).time_reached(1e9)  # no time budget: only the step


def test_densify_merges_into_the_stock_model_and_carries_the_optimizer_state(tmp_path):
    """densify on a prepared Pixelfly GPT-2 after one step: the stock GPT2LMHeadModel with the same outputs, AdamW
    moments carried for the parameters the merge keeps and fresh for the merged weights, the schedule continued."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pixelfly_hf import PixelflyConfig, get_model

    args = parse(["--learning_rate", "1e-3", "--max_train_steps", "10", "--num_warmup_steps", "2"], output_dir=tmp_path)
    accelerator = make_accelerator(args, fixed_shapes=True)
    torch.manual_seed(0)
    model = get_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=64, n_positions=16)),
                      PixelflyConfig(density=0.5, block_size=16, init="random"))
    optimizer = make_optimizer(model, args, accelerator.device)
    scheduler = make_scheduler(optimizer, args, accelerator, range(20))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits

    model, optimizer, scheduler = densify(accelerator, model, optimizer, scheduler, args)
    unwrapped = accelerator.unwrap_model(model)
    assert type(unwrapped) is GPT2LMHeadModel
    with torch.no_grad():
        assert torch.allclose(unwrapped.eval()(input_ids=ids).logits, before, atol=1e-4)
    state = optimizer.optimizer.state
    assert state[unwrapped.transformer.wte.weight]["step"] == 1  # kept by the merge: carried
    assert unwrapped.transformer.h[0].mlp.c_fc.weight not in state  # merged: fresh
    assert scheduler.scheduler.last_epoch == 1 and scheduler.get_last_lr()[0] == pytest.approx(5e-4)  # warmup 1/2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


class _FakeAccelerator:
    """What save_checkpoint and TrainLog need from an Accelerator; save_state writes a file, then maybe dies."""
    is_main_process = True

    def __init__(self, crash=False):
        self.crash = crash
        self.logged = []

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        (Path(path) / "model.safetensors").write_bytes(b"weights")
        if self.crash:
            raise KeyboardInterrupt("killed mid-write")

    def log(self, record, step):
        self.logged.append((step, record))


def test_checkpoints_are_atomic(tmp_path):
    save_checkpoint(_FakeAccelerator(), tmp_path, "step_4", {"completed_steps": 4})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_FakeAccelerator(crash=True), tmp_path, "step_8", {"completed_steps": 8})
    assert not (tmp_path / "step_8").exists()
    assert (tmp_path / ".tmp-step_8").is_dir()  # the half-written one is only ever a temp folder
    args = SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(tmp_path))
    assert find_checkpoint(args) == tmp_path / "step_4"
    # The next save of that step replaces the debris; re-saving an existing step replaces it whole.
    save_checkpoint(_FakeAccelerator(), tmp_path, "step_8", {"completed_steps": 8})
    save_checkpoint(_FakeAccelerator(), tmp_path, "step_4", {"completed_steps": 4, "again": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4", "step_8"]
    assert find_checkpoint(args) == tmp_path / "step_8"
    assert read_checkpoint_state(tmp_path / "step_4")["again"] is True
    with pytest.raises(RecipeError, match="not a complete checkpoint"):
        find_checkpoint(SimpleNamespace(resume_from_checkpoint=str(tmp_path / ".tmp-step_8"),
                                        output_dir=str(tmp_path)))


def test_train_log_keeps_the_records_up_to_the_resumed_step(tmp_path):
    args = SimpleNamespace(with_tracking=True, output_dir=str(tmp_path / "out"))
    accelerator = _FakeAccelerator()
    log = TrainLog(accelerator, args, resumed_step=None)
    for step in (1, 2, 3):
        log.write({"train/loss": float(step)}, step=step)
    assert accelerator.logged[-1] == (3, {"train/loss": 3.0})  # the trackers get it too
    TrainLog(accelerator, args, resumed_step=2)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2]
    TrainLog(accelerator, args, resumed_step=None)
    assert log.path.read_text() == ""  # a fresh run starts a fresh log


def test_optimizer_is_fused_on_gpu_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    args = SimpleNamespace(weight_decay=0.1, learning_rate=1e-3, adam_beta2=0.95)
    for device, fused in (("cuda", True), ("cpu", False)):
        optimizer = make_optimizer(model, args, torch.device(device))
        assert bool(optimizer.defaults["fused"]) is fused
        decay, no_decay = optimizer.param_groups
        assert [p.shape for p in decay["params"]] == [(4, 4)] and decay["weight_decay"] == 0.1
        assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("flag, launched, fixed_shapes, cuda, want", [
    ("auto", None, True, True, ("INDUCTOR", "reduce-overhead")),   # GPT-2 / ViT on a GPU: CUDA graphs
    ("auto", None, False, True, ("INDUCTOR", "default")),          # BERT's padded batches: plain compile
    ("auto", None, True, False, ("NO", None)),                      # CPU: eager
    ("auto", "NO", True, True, ("INDUCTOR", "reduce-overhead")),   # `accelerate launch` without --dynamo_backend
    ("auto", "INDUCTOR", True, True, ("INDUCTOR", "default")),     # ... with it: the launcher's choice stands
    ("off", "INDUCTOR", True, True, ("NO", None)),
    ("cudagraphs", None, False, False, ("INDUCTOR", "reduce-overhead")),
    ("default", "NO", True, True, ("INDUCTOR", "default")),
    ("auto", "NO", True, "ddp", ("INDUCTOR", "default")),          # several processes: no CUDA graphs
])
def test_torch_compile_flag_picks_the_dynamo_plugin(tmp_path, monkeypatch, flag, launched, fixed_shapes, cuda, want):
    for name in ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    if cuda == "ddp":
        monkeypatch.setenv("WORLD_SIZE", "2")
    if launched is not None:
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", launched)
    args = parse(["--torch_compile", flag], output_dir=tmp_path)
    plugin = compile_plugin(args, fixed_shapes=fixed_shapes, cuda=cuda)
    backend, mode = want
    assert plugin.backend.value == backend
    if mode is not None:
        assert plugin.mode == mode


class _Regression(torch.nn.Module):
    """A toy model with the interface TrainingLoop trains: model(**batch).loss."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.dropout = torch.nn.Dropout(0.2)  # draws from the RNG, which a resume must restore

    def forward(self, x, y):
        return SimpleNamespace(loss=torch.nn.functional.mse_loss(self.linear(self.dropout(x)), y))


def train_toy(argv, output_dir):
    """TrainingLoop over 40 examples in batches of 4 (10 steps an epoch); returns (result, train_log records)."""
    args = parse(["--dense", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--learning_rate", "0.05",
                  *argv], output_dir=output_dir)
    accelerator = make_accelerator(args, fixed_shapes=True)
    torch.manual_seed(0)
    x = torch.randn(40, 4)
    examples = [{"x": xi, "y": xi.sum(0, keepdim=True)} for xi in x]
    loader = DataLoader(examples, batch_size=4, shuffle=True, drop_last=True)
    model = _Regression()
    optimizer = make_optimizer(model, args, accelerator.device)
    scheduler = make_scheduler(optimizer, args, accelerator, loader)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    def evaluate_fn(model):
        with torch.no_grad():
            return {"loss": torch.nn.functional.mse_loss(model.linear(x), x.sum(1, keepdim=True)).item()}

    _, result = TrainingLoop(accelerator, args, model, optimizer, scheduler, loader, evaluate_fn,
                             count_fn=lambda batch: len(batch["x"]), unit="examples").run()
    log = [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]
    return result, log


def test_training_loop_resumes_exactly_where_it_stopped(tmp_path):
    """A resume from the step_7 checkpoint, in the second epoch, repeats the uninterrupted run's losses exactly: the
    batches already seen are skipped and the RNG (shuffle, dropout) restored."""
    full, full_log = train_toy(["--max_train_steps", "15", "--checkpointing_steps", "7", "--eval_steps", "5"],
                               tmp_path / "full")
    assert full["completed_steps"] == 15 and full["stopped_by"] == "steps"
    assert full["final_eval"]["loss"] < 0.7 * full["initial_eval"]["loss"]
    train = {r["step"]: r for r in full_log if "train/loss" in r}
    evals = {r["step"]: r for r in full_log if "eval/loss" in r}
    assert sorted(train) == list(range(1, 16)) and sorted(evals) == [0, 5, 10, 15]
    assert evals[15]["train/examples"] == 15 * 4 and full["throughput"] > 0
    assert read_checkpoint_state(tmp_path / "full" / "step_7")["batches_in_epoch"] == 7

    resumed, resumed_log = train_toy(["--max_train_steps", "15", "--resume_from_checkpoint",
                                      str(tmp_path / "full" / "step_7")], tmp_path / "resumed")
    assert resumed["initial_eval"] is None and resumed["completed_steps"] == 15
    again = {r["step"]: r for r in resumed_log if "train/loss" in r}
    assert sorted(again) == list(range(8, 16))
    for step in again:
        assert again[step]["train/loss"] == pytest.approx(train[step]["train/loss"], rel=1e-6), step
    assert resumed["final_eval"]["loss"] == pytest.approx(full["final_eval"]["loss"], rel=1e-6)


def test_training_loop_stops_on_its_time_budget_at_a_logged_step(tmp_path):
    result, log = train_toy(["--max_train_steps", "100000", "--logging_steps", "3", "--max_train_minutes", "1e-9"],
                            tmp_path / "out")
    assert result["stopped_by"] == "time" and result["completed_steps"] == 3
    assert [r["step"] for r in log] == [0, 3, 3]  # the first eval, the train record, the last eval


def test_training_loop_waits_for_the_device_only_before_untimed_work(tmp_path, monkeypatch):
    """The clock waits for queued GPU work before a log, an evaluation, a checkpoint, an epoch's end and the last
    step (whose work would otherwise finish outside it), and at no other step. The steady rate leaves out the first
    logged window (the compile and the kernel tuning)."""
    waits = []
    monkeypatch.setattr("pixelfly_hf.training.loop.synchronize", waits.append)
    result, _ = train_toy(["--max_train_steps", "15", "--logging_steps", "5", "--eval_steps", "3",
                           "--checkpointing_steps", "7"], tmp_path / "out")
    assert len(waits) == len({5, 10, 15} | {3, 6, 9, 12} | {7, 14} | {10})  # logs, evals, checkpoints, epoch end
    assert result["steady_throughput"] > 0

    short, _ = train_toy(["--max_train_steps", "4", "--logging_steps", "5"], tmp_path / "short")
    assert short["steady_throughput"] is None and short["throughput"] > 0

