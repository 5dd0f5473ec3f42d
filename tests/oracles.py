"""Independent references for a plan's output, built from stock transformers models.

- ``masked_stock``: the masked computation of ADALLAVA.md on a stock model, by hooks: a skipped
  head's attention output times 0 before o_proj, a skipped neuron's ``act(gate)*up`` times 0
  before down_proj, a skipped layer's update times 0.
- ``sliced_stock`` (adaptive_kernels.sliced): a stock model of one row's plan, its weights cut to
  the plan: skipped layers removed, q/k/v/o and gate/up/down cut to the active heads and neurons.
"""

from __future__ import annotations

import copy
import inspect

import torch
from transformers import LlamaModel

from adaptive_kernels.sliced import neuron_mask

CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def masked_stock(stock, plan):
    """A deep copy of ``stock`` whose hooks apply ``plan`` (batch rows = plan rows) as masks."""
    model = copy.deepcopy(stock)
    lm = model.model.language_model
    d = lm.config.head_dim if getattr(lm.config, "head_dim", None) else lm.config.hidden_size // lm.config.num_attention_heads
    for l, layer in enumerate(lm.layers):
        head_mask = plan.heads[:, l].repeat_interleave(d, dim=-1)[:, None, :]
        mlp_mask = neuron_mask(plan.groups[:, l], lm.config.intermediate_size)[:, None, :]
        layer_on = plan.layers[:, l][:, None, None]
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, k=head_mask: (args[0] * k.to(args[0].dtype),))
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, args, k=mlp_mask: (args[0] * k.to(args[0].dtype),))

        def keep_or_skip(module, args, kwargs, output, on=layer_on):
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            mixed = torch.where(on, after, before)
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        layer.register_forward_hook(keep_or_skip, with_kwargs=True)
    return model


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
