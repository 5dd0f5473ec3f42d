"""Stock transformers step by step, for the tests' references (the stock models of a plan itself,
masked and sliced, are in adaptive_kernels.sliced, which uses none of the executor's code)."""

from __future__ import annotations

import inspect

import torch
from transformers import LlamaModel

CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def stock_decode_logits(model, embeds, attention_mask, position_ids, new_tokens) -> list[torch.Tensor]:
    """Logits of a stock LLaVA's language model fed ``embeds`` then ``new_tokens`` one at a time.

    Returns [prefill logits [B, S, V], then [B, V] after each new token but the last].
    """
    from transformers import DynamicCache

    lm = model.model.language_model
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        out = lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                 **{CACHE_KWARG: cache})
        steps = [model.lm_head(out.last_hidden_state)]
        mask, pos = attention_mask, position_ids[:, -1:]
        for token in new_tokens[:, :-1].T:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos + 1
            out = lm(inputs_embeds=lm.embed_tokens(token[:, None]), attention_mask=mask, position_ids=pos,
                     use_cache=True, **{CACHE_KWARG: cache})
            steps.append(model.lm_head(out.last_hidden_state[:, -1]))
    return steps
