"""The import graph as a user meets it: each module imports alone in a fresh interpreter (no circle held together
by import order), `import pixelfly_hf` leaves the heavy stack unloaded, and the Auto classes still find the
Pixelfly models."""
import json
import os
import subprocess
import sys

MODULES = [
    "pixelfly_hf.config",
    "pixelfly_hf.patterns",
    "pixelfly_hf.summary",
    "pixelfly_hf.layers.attention",
    "pixelfly_hf.models.configs",
    "pixelfly_hf.models.registry",
    "pixelfly_hf.models.install",
    "pixelfly_hf.models.card",
    "pixelfly_hf.models.base",
    "pixelfly_hf.merge",
    "pixelfly_hf.models.gpt2",
    "pixelfly_hf.mapping",
    "pixelfly_hf.training",
]
# loaded only once transformers' Auto classes or model code, a layer, the planner or get_model is used
HEAVY = ["torch", "transformers.configuration_utils", "pixelfly_hf.models", "pixelfly_kernels", "triton",
         "transformers.modeling_utils", "transformers.models.gpt2.modeling_gpt2", "pixelfly_hf.layers",
         "pixelfly_hf.mapping"]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


def _imported(importtime_log: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


def test_each_module_imports_first_and_mapping_is_imported_by_none():
    """Each module imported first, with every pixelfly_hf module forgotten before (the third-party stack stays
    loaded, which keeps this to one interpreter): a module in a circle fails when imported first, its partner
    finding it half-initialised. Only mapping itself may load mapping (mapping imports models, never the reverse)."""
    code = (
        "import importlib, json, sys\n"
        "loaded_mapping = {}\n"
        f"for module in {MODULES!r}:\n"
        "    for name in [n for n in sys.modules if n == 'pixelfly_hf' or n.startswith('pixelfly_hf.')]:\n"
        "        del sys.modules[name]\n"
        "    importlib.import_module(module)\n"
        "    loaded_mapping[module] = 'pixelfly_hf.mapping' in sys.modules\n"
        "print(json.dumps(loaded_mapping))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded_mapping = json.loads(result.stdout)
    assert list(loaded_mapping) == MODULES
    assert [module for module, loaded in loaded_mapping.items() if loaded] == ["pixelfly_hf.mapping"]


def test_import_pixelfly_hf_leaves_the_heavy_modules_unloaded():
    result = _python("import pixelfly_hf")
    assert result.returncode == 0, result.stderr[-3000:]
    imported = _imported(result.stderr)
    assert "pixelfly_hf.registration" in imported  # the log is read correctly
    assert [name for name in HEAVY if name in imported] == []


def test_the_pixelfly_types_are_registered_whichever_transformers_module_loads_first():
    """Registration waits for transformers' Auto package and modeling code (registration.py): each entry point a user
    may reach first, in a fresh process after `import pixelfly_hf`, ends with the config types and the attention
    registered (an Auto module imports the configuration module half-way through its own code)."""
    check = ("from transformers import AutoConfig, AttentionInterface\n"
             "print(type(AutoConfig.for_model('pixelfly_gpt2')).__name__, 'pixelfly' in AttentionInterface())\n")
    firsts = ["from transformers import AutoConfig", "from transformers import AutoModelForCausalLM",
              "from transformers import AutoTokenizer", "from transformers import GPT2LMHeadModel",
              "from transformers import BertConfig", "from transformers import pipeline"]
    for first in firsts:
        result = _python(f"import pixelfly_hf\n{first}\n{check}")
        assert result.returncode == 0, (first, result.stderr[-3000:])
        assert result.stdout.split() == ["PixelflyGPT2Config", "True"], first


def test_auto_classes_load_a_saved_pixelfly_model_after_a_bare_import(tmp_path):
    """Saved here, loaded in a process that imports only pixelfly_hf: its model classes register lazily."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pixelfly_hf import PixelflyConfig, get_model

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=50, n_positions=32))
    config = PixelflyConfig(target_modules=["mlp"], butterfly_size=2, n_factors=1, low_rank=0, block_size=16)
    get_model(model, config).save_pretrained(tmp_path)
    load = (
        "import pixelfly_hf\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "print(type(model).__name__, type(model.transformer.h[0].mlp.c_fc).__name__)\n"
    )
    result = _python(load)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["PixelflyGPT2LMHeadModel", "PixelflyLinear"]


# A stock GPT-2 asking for "pixelfly" by name: settings on its config, sparse from 32 tokens (16-token blocks)
_STOCK_MODEL = (
    "import torch\n"
    "from transformers import AutoModelForCausalLM, GPT2Config\n"
    "options = {'block_size': 16, 'n_factors': 1, 'n_global_tokens': 16, 'min_seq_len_for_sparse': 32,\n"
    "           'max_density_for_sparse': 1.0}\n"
    "config = GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=50, n_positions=128, bos_token_id=0,\n"
    "                    eos_token_id=0, pixelfly_attention=options)\n"
)
_COMPARE_WITH_SDPA = (
    "import copy\n"
    "dense = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation='sdpa').eval()\n"
    "model.load_state_dict(dense.state_dict())\n"
    "model.eval()\n"
    "ids = torch.randint(0, 50, (2, 96))\n"
    "with torch.no_grad():\n"
    "    sparse_gap = (model(ids).logits - dense(ids).logits).abs().max().item()\n"
    "    short_gap = (model(ids[:, :16]).logits - dense(ids[:, :16]).logits).abs().max().item()\n"
    "print(model.config._attn_implementation, sparse_gap > 1e-3, short_gap < 1e-5)\n"
)


def test_attn_implementation_pixelfly_works_right_after_import_pixelfly_hf():
    """`attn_implementation="pixelfly"` on a stock model in a fresh process that imported only pixelfly_hf: the
    function is registered (while `import pixelfly_hf` still leaves transformers' modeling code unloaded) and is the
    one that runs: it attends sparsely at 96 tokens and falls back to dense SDPA below min_seq_len_for_sparse."""
    code = ("import pixelfly_hf\n" + _STOCK_MODEL
            + "model = AutoModelForCausalLM.from_config(config, attn_implementation='pixelfly')\n" + _COMPARE_WITH_SDPA)
    result = _python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["pixelfly", "True", "True"]


def test_attn_implementation_pixelfly_from_pretrained_and_with_modeling_imported_first(tmp_path):
    """A saved stock model loaded back with `attn_implementation="pixelfly"`, in a process that had loaded
    transformers' modeling code before importing pixelfly_hf (the registration happens at once then)."""
    code = ("import transformers.modeling_utils\nimport pixelfly_hf\n" + _STOCK_MODEL
            + "AutoModelForCausalLM.from_config(config).save_pretrained(" + repr(str(tmp_path)) + ")\n"
            + "model = AutoModelForCausalLM.from_pretrained(" + repr(str(tmp_path)) + ", attn_implementation='pixelfly')\n"
            + _COMPARE_WITH_SDPA)
    result = _python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["pixelfly", "True", "True"]
