"""Independent references for a plan's output, built from stock transformers models.

- ``masked_stock``: the masked computation of ADALLAVA.md on a stock model, by hooks: a skipped
  head's attention output times 0 before o_proj, a skipped neuron's ``act(gate)*up`` times 0
  before down_proj, a skipped layer's update times 0.
- ``sliced_stock``: a stock model of one row's plan, its weights cut to the plan: skipped layers
  removed, q/k/v/o and gate/up/down cut to the active heads and neurons.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers import LlamaModel

CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def neuron_mask(groups: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    """Group mask [..., G] -> neuron mask [..., M]; the first M % G groups hold one neuron more."""
    G = groups.shape[-1]
    base, extra = divmod(intermediate_size, G)
    sizes = torch.tensor([base + (g < extra) for g in range(G)])
    return groups.repeat_interleave(sizes, dim=-1)


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


class _ZeroAttention(nn.Module):
    """A layer's attention with no head left: adds nothing, caches zero heads."""

    def __init__(self, layer_idx: int, head_dim: int):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            B, T, _ = hidden_states.shape
            empty = hidden_states.new_zeros(B, 0, T, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class _ZeroMLP(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def _cut(linear: nn.Linear, rows=None, cols=None, col_scale=None) -> nn.Linear:
    w = linear.weight.detach()
    b = None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        w, b = w[rows], (None if b is None else b[rows])
    if cols is not None:
        w = w[:, cols] * (1 if col_scale is None else col_scale.to(w.dtype))
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None).to(w.dtype)
    out.weight.data.copy_(w)
    if b is not None:
        out.bias.data.copy_(b)
    return out


def sliced_stock(stock, plan, row: int = 0):
    """A stock model computing row ``row`` of ``plan`` with weights cut to it.

    With grouped-query attention, a kept key/value head keeps all its query heads and the o_proj
    columns of the inactive ones are zeroed (stock attention needs whole groups).
    """
    model = copy.deepcopy(stock)
    lm = model.model.language_model
    cfg = lm.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // H
    kept = []
    for l, layer in enumerate(lm.layers):
        if not plan.layers[row, l]:
            continue
        new_idx = len(kept)
        heads, groups = plan.heads[row, l].cpu(), plan.groups[row, l].cpu()
        attn = layer.self_attn
        if heads.any():
            kv_on = heads.view(Hkv, H // Hkv).any(-1)
            q_keep = kv_on.repeat_interleave(H // Hkv)
            q_rows = q_keep.repeat_interleave(d).nonzero().flatten()
            kv_rows = kv_on.repeat_interleave(d).nonzero().flatten()
            scale = heads[q_keep].repeat_interleave(d)
            attn.q_proj, attn.k_proj, attn.v_proj = _cut(attn.q_proj, rows=q_rows), _cut(attn.k_proj, rows=kv_rows), _cut(attn.v_proj, rows=kv_rows)
            attn.o_proj = _cut(attn.o_proj, cols=q_rows, col_scale=scale)
            attn.layer_idx = new_idx
        else:
            layer.self_attn = _ZeroAttention(new_idx, d)
        if groups.any():
            neurons = neuron_mask(groups, cfg.intermediate_size).nonzero().flatten()
            mlp = layer.mlp
            mlp.gate_proj, mlp.up_proj = _cut(mlp.gate_proj, rows=neurons), _cut(mlp.up_proj, rows=neurons)
            mlp.down_proj = _cut(mlp.down_proj, cols=neurons)
        else:
            layer.mlp = _ZeroMLP()
        kept.append((l, layer))
    lm.layers = nn.ModuleList([layer for _, layer in kept])
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[l] for l, _ in kept]
    cfg.num_hidden_layers = len(kept)
    return model


def capture_prompt_embeddings(stock, inputs) -> torch.Tensor:
    """The decoder input a stock LLaVA builds for ``inputs`` (image features merged): [B, S, D]."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = stock.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            stock(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


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
