"""kernels/ installed as `pixelfly_kernels`, and the same folder seen as `kernels` from the repo root."""
import subprocess
import sys
import textwrap

from helpers_recipes import ROOT, recipe_env


def test_the_folder_imported_as_kernels_from_the_repo_root_registers_nothing(tmp_path):
    """With the repo root on sys.path (`python -c`, a REPL or `python -m pytest` there), transformers' probe for the
    Hub `kernels` library imports this folder a second time, as `kernels`. A second copy of the op modules
    re-registers the torch ops; a model's next call then crashed in the dispatcher ("ValueError: vector::reserve",
    in CI). The package imports nothing, so the probe gets an empty module and the model runs, forward and backward."""
    script = textwrap.dedent("""
        import sys, torch
        from pixelfly_hf import PixelflyConfig, get_model
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils.import_utils import is_kernels_available
        model = get_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=97, n_positions=32)),
                          PixelflyConfig(density=0.5, block_size=16, low_rank=8))
        assert not is_kernels_available()
        probed = sys.modules["kernels"]  # the probe imported the folder under that name
        assert probed.__file__.startswith(sys.argv[1]), probed.__file__
        copies = sorted(name for name in sys.modules if name.startswith("kernels."))
        assert not copies, copies
        model(torch.randint(0, 97, (2, 10))).logits.sum().backward()
        print("ONE COPY")
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT)], cwd=ROOT, env=recipe_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ONE COPY" in proc.stdout, proc.stderr[-3000:]
