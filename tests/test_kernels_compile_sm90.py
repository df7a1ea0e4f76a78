"""The autotuner configs of the Triton kernels compile for the H100/H200 (sm_90) here, without a GPU.

The default suite compiles one config of each kernel variant per product (tests/compile_sm90.py, variant_signature);
PIXELFLY_COMPILE_EVERY_CONFIG=1 compiles every config (five times as many; run it after changing the kernels or the
config lists).

The interpreter runs the kernels' arithmetic on CPU but never compiles them, so a config that breaks codegen (a TMA
descriptor layout, the flattened persistent loop) would only show on the GPU, where it stops the autotuner. Triton
compiles for a named target on CPU with its bundled ptxas; tests/compile_sm90.py does it in a process without the
interpreter.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from compile_sm90 import cases, variant_signature

from pixelfly_kernels.butterfly_configs import DW_CONFIGS, DW_SPLIT_CONFIGS, MM_CONFIGS

H100_SHARED_BYTES = 232448  # the most shared memory one block may take on sm_90
EVERY_CONFIG = os.environ.get("PIXELFLY_COMPILE_EVERY_CONFIG") == "1"


def test_the_default_subset_has_every_variant_of_each_product():
    """The default run compiles every variant_signature of each product at least once, the full run every config."""
    def variants(every_config):
        return {(product, variant_signature(config)) for product, _, config, _, _ in cases(every_config)}

    assert len(list(cases(every_config=True))) == 2 * len(MM_CONFIGS) + len(DW_CONFIGS) + len(DW_SPLIT_CONFIGS)
    assert variants(every_config=False) == variants(every_config=True)
    assert len(list(cases(every_config=False))) < len(MM_CONFIGS)


@pytest.mark.parametrize("every_config", [
    False, pytest.param(True, marks=pytest.mark.skipif(not EVERY_CONFIG, reason="PIXELFLY_COMPILE_EVERY_CONFIG=1"))],
    ids=["one-per-variant", "every-config"])
def test_configs_compile_for_sm90_with_the_hopper_instructions(every_config):
    """One config of each variant per product, or (PIXELFLY_COMPILE_EVERY_CONFIG=1) every config."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--every-config"] if every_config else []
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_sm90.py")), *args], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == len(list(cases(every_config)))
    failed = [(r["product"], r["config"], r["error"]) for r in rows if not r["ok"]]
    assert not failed, failed
    for r in rows:
        # Hopper tensor cores (wgmma needs 64 rows per warp group; the 32-row dW tiles for q = 24 fall back to mma)
        assert r["wgmma"] or r["config"].startswith("BLOCK_M: 32,"), r
        # TMA configs use the bulk tensor copy engine; pointer configs are software-pipelined through shared memory
        assert r["bulk_tensor_copies"] if r["tma"] else r["pipelined"], r
        # the epilogue stores through a descriptor exactly in the configs that ask for it
        assert r["bulk_tensor_stores"] == ("TMA_STORE: True" in r["config"]), r
        assert r["shared_bytes"] <= H100_SHARED_BYTES, r
        # the token-split dW adds its fp32 partial tiles with vector atomics (4 floats per instruction), nothing else adds
        assert r["vector_atomic_adds"] == (r["product"] == "dW split"), r


def test_patches_24_or_40_wide_still_get_16_byte_async_copies_and_vector_stores():
    """Triton proves only 16-divisibility of integer arguments. Without the kernels' *_ALIGN hints a 40- or 24-wide
    patch (1280- and 768-wide models at butterfly size 32) compiled to 2-byte loads and stores and no async copies:
    1280->5120's forward took 0.39 ms, slower than dense."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_sm90.py")), "--narrow-patches"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 10
    for row in rows:
        assert row["async_copies_16_bytes"] > 0 and row["two_byte_accesses"] == 0 and row["vector_stores"] > 0, row


def test_k_tail_steps_compile_with_tensor_cores_and_tma():
    """80-wide K patches run 64-wide steps plus a 16-wide tail per slot (pointer loads beside the TMA main steps):
    both must still compile to wgmma, the TMA config to bulk tensor copies, within the shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_sm90.py")), "--k-tail"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 4 and {r["tma"] for r in rows} == {True, False}
    for r in rows:
        assert r["wgmma"] and r["bulk_tensor_copies"] == r["tma"] and r["shared_bytes"] <= H100_SHARED_BYTES, r
