"""pixelfly_hf.training on its own, in this process, without a recipe: the flags and the PixelflyConfig built from
them, atomic checkpoints, the optimizer, the compile choice."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pixelfly_hf.training import (ArgumentParser, RecipeError, add_pixelfly_args, add_training_args, check_args,
                                  compile_plugin, find_checkpoint, make_optimizer, read_checkpoint_state,
                                  save_checkpoint)


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


class _FakeAccelerator:
    """What save_checkpoint needs from an Accelerator; save_state writes a file, then maybe dies."""
    is_main_process = True

    def __init__(self, crash=False):
        self.crash = crash

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        (Path(path) / "model.safetensors").write_bytes(b"weights")
        if self.crash:
            raise KeyboardInterrupt("killed mid-write")


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
