"""Helpers for the tests of the project's scripts (recipes, benchmarks, research): run a recipe in a fresh CPU
process, offline, or load a script as a module."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ACCELERATE = Path(sys.executable).with_name("accelerate")


def recipe_env(hf_home, threads=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "HF_ENDPOINT"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_recipe(recipe, args, hf_home, *, processes=1, timeout=600, check=True, extra_env=None, launcher=None):
    """Run recipes/<recipe> with `python` (one process), `launcher` (a command line such as `accelerate launch
    --cpu`) or `accelerate launch` on CPU (two real processes)."""
    if processes == 1:
        cmd = [*(launcher or [sys.executable]), str(RECIPES / recipe), *args]
        env = recipe_env(hf_home)
    else:
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(RECIPES / recipe), *args]
        env = recipe_env(hf_home, threads=1)
        env["ACCELERATE_USE_CPU"] = "1"
    env.update(extra_env or {})
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def import_script(path):
    """The script at `path` as a module (a fresh one per call): scripts are run, not installed, so no import path
    reaches them."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_log(output_dir):
    """train_log.jsonl as {step: record}, train records and eval records separately."""
    train, evals = {}, {}
    for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        (train if "train/loss" in record else evals)[record["step"]] = record
    return train, evals


def read_results(output_dir):
    return json.loads((Path(output_dir) / "all_results.json").read_text())
