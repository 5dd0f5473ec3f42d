"""Per-architecture patches, keyed by the language model's ``config.model_type``."""

from __future__ import annotations

from ..errors import ArgumentTypeError
from .llama import Request, Settings, decoder_shape, serving

# language model types whose decoder layers the Llama executor runs unchanged
SUPPORTED_TEXT_MODELS = {"llama": decoder_shape}


def text_model_shape(model):
    """The DecoderShape of a LLaVA model's language model; ``ArgumentTypeError`` for unsupported ones."""
    config = model.config.text_config
    if config.model_type not in SUPPORTED_TEXT_MODELS:
        raise ArgumentTypeError(f"model: adaptive_kernels supports LLaVA models whose language model is one of "
                                f"{sorted(SUPPORTED_TEXT_MODELS)}; got {config.model_type!r}")
    return SUPPORTED_TEXT_MODELS[config.model_type](config)


__all__ = ["Request", "Settings", "serving", "text_model_shape"]
