"""Registers the "pixelfly" attention with transformers as soon as transformers' modeling code is loaded.

`attn_implementation="pixelfly"` must work on any model right after `import pixelfly_hf`, but the registries
(`AttentionInterface`, `AttentionMaskInterface`) live in `transformers.modeling_utils`, which takes over a second to
import and which a script that only builds or saves a config never needs. So the registration waits for that
module: importing `pixelfly_hf.layers.attention` registers the function, and it is imported right after
`transformers.modeling_utils` finishes loading (at once if it already has). Every model class imports
`modeling_utils` before it checks `attn_implementation`, so the name is always registered in time.
"""
import importlib
import importlib.abc
import importlib.util
import sys

MODELING_MODULE = "transformers.modeling_utils"
ATTENTION_MODULE = "pixelfly_hf.layers.attention"


class _RegisterAfterModelingUtils(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for `transformers.modeling_utils` it returns the spec the other finders give, with the
    loader's exec_module followed by the import of the attention module. Removes itself on first use."""

    def find_spec(self, name, path, target=None):
        if name != MODELING_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            importlib.import_module(ATTENTION_MODULE)

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if MODELING_MODULE in sys.modules:
        importlib.import_module(ATTENTION_MODULE)
    elif not any(isinstance(finder, _RegisterAfterModelingUtils) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterModelingUtils())
