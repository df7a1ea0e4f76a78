"""Atomic, resumable checkpoints: written to a temp folder, fsynced, then renamed, so a folder named step_N /
epoch_N is always complete. A crash mid-write leaves only a .tmp-* folder, which is never loaded."""
import json
import os
import shutil
from pathlib import Path

from .errors import RecipeError

STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"


def _fsync_tree(path):
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator, output_dir, name, state):
    """accelerator.save_state into output_dir/name atomically; `state` (a dict) goes to trainer_state.json."""
    final = Path(output_dir) / name
    tmp = Path(output_dir) / f"{TMP_PREFIX}{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its own RNG state into tmp
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step after resuming from an older checkpoint
            old = Path(output_dir) / f"{TMP_PREFIX}old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(output_dir)
    accelerator.wait_for_everyone()
    return final


def read_checkpoint_state(path):
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise RecipeError(f"{path} is not a complete checkpoint of these recipes (no {STATE_FILE}); "
                          "give a step_N / epoch_N folder written by --checkpointing_steps")
    return json.loads(state_file.read_text())


def find_checkpoint(args):
    """The checkpoint folder to resume from, or None."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint != "latest":
        read_checkpoint_state(args.resume_from_checkpoint)
        return Path(args.resume_from_checkpoint)
    out = Path(args.output_dir)
    candidates = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX)
                  and (p / STATE_FILE).is_file()] if out.is_dir() else []
    if not candidates:
        return None
    return max(candidates, key=lambda p: read_checkpoint_state(p)["completed_steps"])
