"""Pixelfly GPT-2: GPT2Model, GPT2LMHeadModel and GPT2ForSequenceClassification (Conv1D matrices)."""
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
)

from pixelfly_hf.models.base import PixelflyModelMixin
from pixelfly_hf.models.registry import Architecture, register_architecture
from pixelfly_hf.models.configs import PixelflyGPT2Config


class PixelflyGPT2Model(PixelflyModelMixin, GPT2Model):
    config_class = PixelflyGPT2Config


class PixelflyGPT2LMHeadModel(PixelflyModelMixin, GPT2LMHeadModel):
    config_class = PixelflyGPT2Config
    default_loss_type = "ForCausalLM"


class PixelflyGPT2ForSequenceClassification(PixelflyModelMixin, GPT2ForSequenceClassification):
    config_class = PixelflyGPT2Config


register_architecture(
    Architecture(
        name="gpt2",
        config_class=PixelflyGPT2Config,
        roles={"attn": r"h\.\d+\.attn\.(c_attn|c_proj)", "mlp": r"h\.\d+\.mlp\.(c_fc|c_proj)"},
        models={
            GPT2Model: (PixelflyGPT2Model, AutoModel),
            GPT2LMHeadModel: (PixelflyGPT2LMHeadModel, AutoModelForCausalLM),
            GPT2ForSequenceClassification: (PixelflyGPT2ForSequenceClassification, AutoModelForSequenceClassification),
        },
    )
)
