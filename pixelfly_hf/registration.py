"""Registers pixelfly_hf with transformers when transformers needs it, not at `import pixelfly_hf`.

- The Pixelfly config types with AutoConfig (importing `pixelfly_hf.models` does it) once transformers' Auto
  configuration module has loaded. Their model classes follow when a Pixelfly config is built (models/configs.py).
- The "pixelfly" attention with AttentionInterface and AttentionMaskInterface (importing
  `pixelfly_hf.layers.attention` does it) once `transformers.modeling_utils`, which holds those registries, has loaded.

The config classes subclass transformers' GPT2Config/BertConfig/ViTConfig, whose modules import torch (about a
second); registering on demand keeps `import pixelfly_hf` to the standard library, while every path that can meet a
Pixelfly model type or `attn_implementation="pixelfly"` (Auto classes, model classes, `from_pretrained`) loads those
transformers modules first, so the names are registered in time. Registration waits until no module of
transformers' Auto package is still half-loaded: the config modules' docstring decorators read
`transformers.models.auto.modeling_auto`, which imports the configuration module before its own mappings exist.
"""
import importlib
import importlib.abc
import importlib.util
import sys

AUTO_PACKAGE = "transformers.models.auto"
# what must be loaded -> our module that registers, imported right after
REGISTER_AFTER = {
    f"{AUTO_PACKAGE}.configuration_auto": "pixelfly_hf.models",
    "transformers.modeling_utils": "pixelfly_hf.layers.attention",
}


def _watched(name: str) -> bool:
    return name in REGISTER_AFTER or name == AUTO_PACKAGE or name.startswith(AUTO_PACKAGE + ".")


def _half_loaded(name: str) -> bool:
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))  # set by importlib while the module's code runs


def register_what_is_ready(just_loaded: str | None = None) -> None:
    """Import our registering modules whose transformers module is loaded, unless a watched module other than
    `just_loaded` (whose code has run, though importlib has not marked it done yet) is still half-loaded."""
    if any(_half_loaded(name) for name in list(sys.modules) if _watched(name) and name != just_loaded):
        return
    for theirs, ours in REGISTER_AFTER.items():
        if theirs in sys.modules:
            importlib.import_module(ours)


class _RegisterAfterLoad(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched transformers module it returns the spec the other finders give, with
    the loader's exec_module followed by register_what_is_ready."""

    def __init__(self):
        self._resolving = set()

    def find_spec(self, name, path, target=None):
        if not _watched(name) or name in self._resolving:
            return None
        self._resolving.add(name)  # the find_spec below asks every finder, this one too
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._resolving.discard(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register_what_is_ready(just_loaded=name)

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if not any(isinstance(finder, _RegisterAfterLoad) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLoad())
    register_what_is_ready()
