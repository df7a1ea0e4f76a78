"""The Pixelfly config classes of every architecture, registered with AutoConfig on import.

No register_for_auto_class: a saved folder then carries no auto_map and no copied source (no remote code).

Only configs live here: they import transformers' configuration modules, not its modeling code, so
`import pixelfly_hf` stays cheap. Building a Pixelfly config (which every Auto*.from_pretrained / from_config
does before it looks up a model class) imports the architecture's model module, which registers its model
classes with the Auto classes.
"""
import importlib

from transformers import AutoConfig, BertConfig, GPT2Config, ViTConfig

from ..config import PixelflyAttentionConfig


class PixelflyConfigMixin:
    """Mixed into each Pixelfly config class, which declares the fields
    `pixelfly: dict | None = None` (the plan, see models/install.py) and
    `pixelfly_attention: dict | None = None` (PixelflyAttentionConfig fields; None keeps the model's attention),
    and `architecture_module`, the module of its model classes.

    attn_implementation is not saved in config.json, so a config with Pixelfly attention settings defaults it
    to "pixelfly" (an explicit attn_implementation= still wins).
    """

    def __post_init__(self, **kwargs):
        importlib.import_module(self.architecture_module)
        if self.pixelfly_attention:  # validated (and old option names renamed) when the config is loaded
            self.pixelfly_attention = PixelflyAttentionConfig.from_dict(self.pixelfly_attention).to_dict()
        if self.pixelfly_attention and kwargs.get("attn_implementation") is None:
            importlib.import_module("pixelfly_hf.layers.attention")  # registers "pixelfly" with transformers
            kwargs["attn_implementation"] = "pixelfly"
        super().__post_init__(**kwargs)


class PixelflyGPT2Config(PixelflyConfigMixin, GPT2Config):
    model_type = "pixelfly_gpt2"
    architecture_module = "pixelfly_hf.models.gpt2"
    pixelfly: dict | None = None
    pixelfly_attention: dict | None = None


class PixelflyBertConfig(PixelflyConfigMixin, BertConfig):
    model_type = "pixelfly_bert"
    architecture_module = "pixelfly_hf.models.bert"
    pixelfly: dict | None = None
    pixelfly_attention: dict | None = None


class PixelflyViTConfig(PixelflyConfigMixin, ViTConfig):
    model_type = "pixelfly_vit"
    architecture_module = "pixelfly_hf.models.vit"
    pixelfly: dict | None = None
    pixelfly_attention: dict | None = None


CONFIG_CLASSES = (PixelflyGPT2Config, PixelflyBertConfig, PixelflyViTConfig)

for _config_class in CONFIG_CLASSES:
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
