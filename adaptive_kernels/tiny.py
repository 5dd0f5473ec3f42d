"""A built-in tiny random LLaVA (CLIP tower, projector, Llama decoder) and example inputs; no download."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from .errors import refusal
from .plan import check_positive_integer, is_integer

IMAGE_TOKEN_ID = 511
TINY_RANK = 2  # the H rank for the tiny model: 4 units in its 8 heads


def tiny_llava_config(num_layers: int = 8, num_heads: int = 8, num_kv_heads: int = 4, hidden_size: int = 64,
                      intermediate_size: int = 172, vocab_size: int = 512) -> LlavaConfig:
    """A LLaVA-1.5-shaped config at toy sizes: 16 image tokens from a 28x28 image in 7x7 patches, the image token
    ``IMAGE_TOKEN_ID``. ``ValueError`` naming the size for sizes that are not positive integers, a vocabulary
    without the image token's id, or sizes a Llama decoder cannot run (heads that do not divide the hidden size, or
    key/value heads the heads)."""
    sizes = dict(num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, hidden_size=hidden_size,
                 intermediate_size=intermediate_size, vocab_size=vocab_size)
    for name, value in sizes.items():
        check_positive_integer(name, value)
    if vocab_size <= IMAGE_TOKEN_ID:
        raise ValueError(f"vocab_size must exceed the image token's id {IMAGE_TOKEN_ID}, got {vocab_size}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"tiny_llava_config: num_heads must divide hidden_size and num_kv_heads num_heads, got "
                         f"hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads}")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=7, projection_dim=32)
    text = LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                       num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, vocab_size=vocab_size,
                       max_position_embeddings=512, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, image_seq_length=16,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def tiny_llava(seed: int = 0, **sizes) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny LLaVA in eval mode, the same for the same seed and sizes. Its decoder's
    norm weights are drawn too (transformers starts them at 1), so that a norm given the wrong weight shows."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(tiny_llava_config(**sizes)).eval()
        for name, weight in model.model.language_model.named_parameters():
            if name.endswith("norm.weight"):
                weight.data.uniform_(0.5, 1.5)
    return model


def image_token_count(model) -> int:
    """The image tokens one image fills in ``model``'s prompt: the positions of its vision tower's embeddings
    (CLIP: the patches and a class token; SigLIP: the patches), less the first under the feature selection
    ``"default"``, which drops it (``"full"`` keeps them all). ``ValueError`` for a tower without them."""
    tower = model.model.vision_tower
    embeddings = next((m for m in tower.modules() if hasattr(m, "num_positions")), None)
    if embeddings is None:
        raise ValueError(f"model: cannot count the image tokens of its {type(tower).__name__} vision tower, which has "
                         "no embeddings with num_positions (CLIP's or SigLIP's)")
    return embeddings.num_positions - (model.config.vision_feature_select_strategy == "default")


def example_inputs(model, batch_size: int = 1, text_tokens: int = 12, seed: int = 0, pad: list[int] | None = None) -> dict:
    """``batch_size`` random prompts (at least 1) of ``text_tokens`` text tokens (0 or more; a count that is not
    one is refused naming it): two text tokens, the image tokens (``image_token_count``), then the rest of the
    text (ids in [1, vocab_size), the image token's excepted).

    ``pad`` gives the number of left-padding positions per row (default none), each at most ``text_tokens - 2``:
    a row padded by n drops its last n tokens, the image's kept (``ValueError`` otherwise).
    """
    check_positive_integer("batch_size", batch_size)
    if not is_integer(text_tokens) or text_tokens < 0:
        raise refusal(is_integer(text_tokens))(f"text_tokens must be a non-negative integer, got {text_tokens!r}")
    pad = list(pad or [])
    if len(pad) > batch_size or not all(is_integer(n) and 0 <= n <= text_tokens - 2 for n in pad):
        raise ValueError(f"pad: at most one count per row ({batch_size}), each an int in [0, text_tokens - 2 = "
                         f"{text_tokens - 2}], got {pad!r}")
    config = model.config
    image_tokens = image_token_count(model)
    g = torch.Generator().manual_seed(seed)
    vocab_size, image_token_id = config.text_config.vocab_size, config.image_token_id
    among_text = 1 <= image_token_id < vocab_size  # an id the text's range holds, to be stepped over
    text = torch.randint(1, vocab_size - among_text, (batch_size, text_tokens), generator=g)
    text += among_text & (text >= image_token_id)  # past the image token's id
    ids = torch.cat([text[:, :2], torch.full((batch_size, image_tokens), config.image_token_id), text[:, 2:]], dim=1)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pad):
        if n:
            ids[row] = torch.cat([torch.zeros(n, dtype=ids.dtype), ids[row, :-n]])
            mask[row, :n] = 0
    size = config.vision_config.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=g)
    device, dtype = model.device, model.dtype
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "pixel_values": pixels.to(device, dtype)}
