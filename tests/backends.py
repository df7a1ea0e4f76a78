"""The kernel implementations the CPU tests compare: Triton runs on CPU tensors only in its interpreter."""
import os

import pytest

# with a GPU, conftest leaves TRITON_INTERPRET unset and the kernels compile for CUDA: skip Triton-on-CPU cases
TRITON_ON_CPU = pytest.param(
    "triton", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
)
BACKENDS = ["reference", TRITON_ON_CPU]
