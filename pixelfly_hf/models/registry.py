"""The architecture registry: which transformers classes get Pixelfly versions, and with which Auto class.

An architecture file (gpt2.py, bert.py, vit.py) declares one Pixelfly model class per supported transformers
class, over its Pixelfly config class from configs.py, and which module names play which role, then calls
`register_architecture`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """One supported model family.

    roles: role name ("attn", "mlp") -> regex that fully matches the names, relative to the base model, of the
    matrices playing that role. models: transformers class -> (Pixelfly subclass, Auto class it registers with).
    """

    name: str
    config_class: type
    roles: dict[str, str]
    models: dict[type, tuple[type, type]]


ARCHITECTURES: list[Architecture] = []


def register_architecture(arch: Architecture) -> None:
    """Make the architecture's Pixelfly classes loadable through the Auto classes once pixelfly_hf is imported
    (configs.py registers the config class).

    No register_for_auto_class: that would make save_pretrained copy this package's source into the checkpoint
    and write an auto_map, i.e. ask every loader to run remote code. Loading needs `import pixelfly_hf` instead.
    """
    for pixelfly_class, auto_class in arch.models.values():
        auto_class.register(arch.config_class, pixelfly_class, exist_ok=True)
    ARCHITECTURES.append(arch)


def supported_classes() -> list[str]:
    return [cls.__name__ for arch in ARCHITECTURES for cls in arch.models]


def dense_class_of(pixelfly_class: type) -> type:
    """The transformers class a Pixelfly model class patches."""
    return next(cls for arch in ARCHITECTURES for cls, (ours, _) in arch.models.items() if ours is pixelfly_class)


def auto_class_of(pixelfly_class: type) -> type:
    """The Auto class (e.g. AutoModelForCausalLM) a Pixelfly model class is registered with."""
    return next(auto for arch in ARCHITECTURES for ours, auto in arch.models.values() if ours is pixelfly_class)
