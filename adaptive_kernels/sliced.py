"""Stock transformers LLaVA models of an execution plan, independent of our executor.

- ``sliced_stock``: one row of the plan with the weights cut to it. Skipped layers are removed;
  q/k/v/o and gate/up/down keep only the active heads and neurons. It runs with stock attention
  and cuBLAS: the ideal that skipping can reach (a dense model of the plan's size) in benchmarks,
  and an oracle in tests.
- ``masked_stock``: the masked computation of ADALLAVA.md, by hooks: a skipped head's attention
  output times 0 before o_proj, a skipped neuron's ``act(gate)*up`` times 0 before down_proj, a
  skipped layer's update times 0. Every weight is read: an oracle in tests; its hooks
  (``mask_hooks``, on the model itself) are the sweep's no-skipping baseline.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .plan import group_sizes


def _head_dim(config) -> int:
    """A Llama text config's head size: its ``head_dim``, else hidden size over heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def neuron_mask(groups: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    """Group mask [..., G] -> neuron mask [..., M]."""
    sizes = torch.tensor(group_sizes(intermediate_size, groups.shape[-1]), device=groups.device)
    return groups.repeat_interleave(sizes, dim=-1)


def _bias_only(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What a projection with no input unit left gives for x [..., D]: its bias, or zeros."""
    out = torch.zeros_like(x)
    return out if bias is None else out + bias


class _ZeroAttention(nn.Module):
    """A layer's attention with no head left: adds only o_proj's bias, and caches one key/value head
    of zeros that no query reads. Stock caches take the sequence length from a layer's keys (the
    first layer's, for the decode mask and positions), and an empty head dimension reads as length 0."""

    def __init__(self, layer_idx: int, head_dim: int, o_bias: torch.Tensor | None):
        super().__init__()
        self.layer_idx, self.head_dim, self.o_bias = layer_idx, head_dim, o_bias

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            B, T, _ = hidden_states.shape
            zeros = hidden_states.new_zeros(B, 1, T, self.head_dim)
            cache.update(zeros, zeros, self.layer_idx)
        return _bias_only(hidden_states, self.o_bias), None


class _ZeroMLP(nn.Module):
    """A layer's MLP with no neuron left: adds only down_proj's bias."""

    def __init__(self, down_bias: torch.Tensor | None):
        super().__init__()
        self.down_bias = down_bias

    def forward(self, x):
        return _bias_only(x, self.down_bias)


def _cut(linear: nn.Linear, rows=None, cols=None, col_scale=None) -> nn.Linear:
    w = linear.weight.detach()
    b = None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        rows = rows.to(w.device)
        w, b = w[rows], (None if b is None else b[rows])
    if cols is not None:
        w = w[:, cols.to(w.device)] * (1 if col_scale is None else col_scale.to(w.device, w.dtype))
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
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
    d = _head_dim(cfg)
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
            layer.self_attn = _ZeroAttention(new_idx, d, attn.o_proj.bias)
        if groups.any():
            neurons = neuron_mask(groups, cfg.intermediate_size).nonzero().flatten()
            mlp = layer.mlp
            mlp.gate_proj, mlp.up_proj = _cut(mlp.gate_proj, rows=neurons), _cut(mlp.up_proj, rows=neurons)
            mlp.down_proj = _cut(mlp.down_proj, cols=neurons)
        else:
            layer.mlp = _ZeroMLP(layer.mlp.down_proj.bias)
        kept.append((l, layer))
    lm.layers = nn.ModuleList([layer for _, layer in kept])
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[l] for l, _ in kept]
    cfg.num_hidden_layers = len(kept)
    return model


def mask_hooks(model, plan) -> list:
    """Forward hooks that make ``model`` (a stock LLaVA) compute ``plan`` (batch rows = plan rows, on
    the model's device) as the masked computation; returns their handles (``.remove()`` undoes one)."""
    return unit_mask_hooks(model, plan.layers, plan.heads, plan.groups)


def unit_mask_hooks(model, layers, heads, groups) -> list:
    """Forward hooks that make ``model`` (a stock LLaVA) compute the masked computation of masks over all
    its layers: layers [B, L], heads and groups [B, L, H]. Each head's attention output is multiplied by
    its mask before o_proj, each neuron's ``act(gate)*up`` by its group's before down_proj. Bool masks
    keep or skip each layer's output; float masks add ``mask * (output - input)``, differentiable in the
    masks as training defines them. Returns the handles (``.remove()`` undoes one)."""
    lm = model.model.language_model
    cfg = lm.config
    d = _head_dim(cfg)
    handles = []
    for l, layer in enumerate(lm.layers):
        head_mask = heads[:, l].repeat_interleave(d, dim=-1)[:, None, :]
        mlp_mask = neuron_mask(groups[:, l], cfg.intermediate_size)[:, None, :]
        layer_on = layers[:, l][:, None, None]

        def keep_or_skip(module, args, kwargs, output, on=layer_on):
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            mixed = torch.where(on, after, before) if on.dtype == torch.bool else before + on * (after - before)
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        handles += [
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, k=head_mask: (args[0] * k.to(args[0].dtype),)),
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, args, k=mlp_mask: (args[0] * k.to(args[0].dtype),)),
            layer.register_forward_hook(keep_or_skip, with_kwargs=True)]
    return handles


def masked_stock(stock, plan):
    """A deep copy of ``stock`` that computes ``plan`` (batch rows = plan rows) as the masked computation."""
    model = copy.deepcopy(stock)
    mask_hooks(model, plan)
    return model
