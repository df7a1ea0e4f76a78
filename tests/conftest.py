"""Test-session setup: an offline Hub and, without a GPU, Triton's CPU interpreter (set before any kernel
module is imported; with a GPU the kernels compile for it and the `gpu` tests run)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _kernel_accesses_in_bounds():
    """In the interpreter every Triton launch of every test must touch only its own tensors' memory: on the GPU an
    access past them stops the process, in the interpreter it would silently read or corrupt what lies there."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from bounds_check import checked_accesses

    with checked_accesses():
        yield


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """An empty HF_HOME per test module for the recipe subprocesses (no shared dataset cache between modules)."""
    return tmp_path_factory.mktemp("hf_home")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
