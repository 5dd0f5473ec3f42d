"""The adaptive Llama-family decoder: runs an execution plan layer by layer.

A skipped layer is not called; an executed layer runs on the batch rows that execute it, with
attention over their active heads and the MLP over their active neuron groups, through the ops
of the chosen backend. The KV cache (``AdaptiveCache``) keeps executed layers and heads only.
A graph-safe request (inside ``graph_safe()`` or a CUDA-graph capture) runs every layer instead, over
fixed-width index buffers that mark what is off (``plan.fixed_width_schedule``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.utils import can_return_tuple

from ..backends import Backend, check_backend
from ..cache import AdaptiveCache
from ..errors import ArgumentTypeError
from ..graphs import DecodeGraph, capturable, capturing, runs_graph_safe
from ..ops.attention import head_sparse_attention_reference
from ..ops.projections import cols_major
from ..ops.rotary import rotary_reference
from ..plan import (DecoderShape, ExecutionPlan, LayerIndices, Schedule, UnitSpace, check_bool_tensor, compact_plan,
                    dense_layer, fixed_width_schedule, listed_schedule, neuron_groups, resolve_budgets, unflatten_masks)

# transformers renamed the cache field of model outputs from past_key_values to cache (5.2x)
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_argument(kwargs: dict) -> str:
    """The keyword a caller's cache is read from, as transformers reads it: ``cache`` where given (a
    ``past_key_values`` beside it is ignored), else ``past_key_values``."""
    return "cache" if "cache" in kwargs else "past_key_values"


# the MLP activations that run as the fused SwiGLU op: torch's SiLU and the module transformers builds for
# hidden_act="silu" (its own class, SiLUActivation, in transformers 5)
SILU_MODULES = (torch.nn.SiLU, type(ACT2FN["silu"]))


@dataclass
class Request:
    """What one call of the patched model asks of the decoder, and the plan it ran (``plan``)."""

    latency_budget: object = None
    execution_plan: ExecutionPlan | None = None
    plan_only: bool = False
    plan: ExecutionPlan | None = None


_SERVING = contextvars.ContextVar("adaptive_kernels_serving", default=(None, None))  # (decoder, its Request)


@contextlib.contextmanager
def serving(decoder, request: Request):
    """Within the block, calls of ``decoder`` in this thread (this context) serve ``request``; another
    thread's calls of the same model serve their own."""
    token = _SERVING.set((decoder, request))
    try:
        yield request
    finally:
        _SERVING.reset(token)


def current_request(decoder) -> Request:
    """The request ``decoder`` serves here (``serving``), else a plain one: every unit on."""
    owner, request = _SERVING.get()
    return request if owner is decoder else Request()


@dataclass
class Settings:
    """A patched decoder's fixed settings."""

    units: UnitSpace  # its variant, prefix and rank
    shape: DecoderShape
    backend: Backend
    cuda_graphs: bool


def decoder_shape(config) -> DecoderShape:
    """The sizes of a Llama-family text config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return DecoderShape(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, num_heads=heads,
                        num_kv_heads=config.num_key_value_heads or heads, head_dim=head_dim,
                        intermediate_size=config.intermediate_size)


PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
_PROJECTION_PATHS = tuple(tuple(path.split(".")) for path in PROJECTIONS)  # (part, name) in a layer's module dicts
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def projection_shapes(shape: DecoderShape) -> tuple:
    """Per projection (in ``PROJECTIONS``' order) the [out, in] shape of its weight in a decoder of ``shape``."""
    D, M = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return (q, D), (kv, D), (kv, D), (D, q), (M, D), (M, D), (D, M)


OUTPUT_CAPTURING = "transformers.utils.output_capturing"  # its hooks record outputs only for a stock forward


def _foreign_hooks(module) -> list:
    """``module``'s hooks but those transformers' output capturing installs (a stock call with hidden states or
    attentions puts them on every layer for good; they record nothing while the patched decoder runs)."""
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values(),
             *module._backward_pre_hooks.values(), *module._backward_hooks.values()]
    return [hook for hook in hooks if getattr(hook, "__module__", None) != OUTPUT_CAPTURING]


def check_layers(decoder, shape: DecoderShape) -> None:
    """``ArgumentTypeError`` unless every layer's projections are plain ``torch.nn.Linear`` modules with
    float weights of 16 bits or more, and no module of a layer (the layer included) nor the final norm has
    hooks: the executor reads projection weights itself and runs a layer's parts and the final norm without
    calling them, so a quantised, adapter-wrapped or hooked (``torch.nn.utils.prune``) projection would be
    computed wrong, and a hook on a layer, its attention, MLP or norms would not be called, not refused later.
    ``ValueError`` for fewer layers than the config's ``num_hidden_layers``, which plans count, and for a weight of
    another shape than a decoder of ``shape`` has (plans and index lists count its heads and neurons)."""
    if len(decoder.layers) < decoder.config.num_hidden_layers:
        raise ValueError(f"model: its language model has {len(decoder.layers)} decoder layers, its config "
                         f"num_hidden_layers={decoder.config.num_hidden_layers}; plans count the config's layers, so "
                         "set num_hidden_layers to the layers there are")
    for l, layer in enumerate(decoder.layers):
        for name, expected in zip(PROJECTIONS, projection_shapes(shape)):
            module = layer.get_submodule(name)
            weight = getattr(module, "weight", None)
            if type(module) is not torch.nn.Linear or getattr(weight, "dtype", None) not in WEIGHT_DTYPES:
                raise ArgumentTypeError(
                    f"model: layer {l}'s {name} is a {type(module).__name__} with {getattr(weight, 'dtype', 'no')} "
                    f"weights; adaptive_kernels reads projection weights itself and takes plain torch.nn.Linear "
                    f"layers with weights in {[str(d) for d in WEIGHT_DTYPES]} (no quantised or adapter-wrapped ones: "
                    f"merge an adapter into the weights first)")
            if tuple(weight.shape) != expected:
                raise ValueError(f"model: layer {l}'s {name} weight is {tuple(weight.shape)}, but the config's sizes "
                                 f"({shape}) make it {expected}; plans and index lists count heads and neurons by "
                                 "the config, the same in every layer, so every layer must have those sizes (patch "
                                 "again after changing them)")
        for name, module in layer.named_modules():
            if _foreign_hooks(module):
                where = f"layer {l}'s {name}" if name else f"layer {l}"
                raise ArgumentTypeError(
                    f"model: {where} has hooks (torch.nn.utils.prune adds one to a projection); adaptive_kernels "
                    "runs a layer's parts itself and would not call them: remove them (prune.remove) first")
    if _foreign_hooks(decoder.norm):
        raise ArgumentTypeError("model: the language model's final norm has hooks; adaptive_kernels runs it itself "
                                "(adding the last layer's update in its kernel) and would not call them: remove them "
                                "first")


def recheck_layers(decoder) -> None:
    """For a decoder edited since patch: ``ValueError`` for a text config whose sizes are no longer those patched
    (its ``num_hidden_layers`` lowered, say), for fewer layers than patched, for a layer that is not the patched
    class (a stock layer set in its place), and ``check_layers``' refusals of a projection that is no plain
    ``torch.nn.Linear`` (an adapter's wrapper, say, of which the executor would read the weight alone) or whose
    weight has another shape (a pruned one, past whose end the executor would read). Reads the module dicts: cheap
    enough for every request."""
    shape = decoder._ak_settings.shape
    configured = decoder_shape(decoder.config)
    if configured != shape:
        raise ValueError(f"model: its text config gives {configured}, but it was patched at {shape}; plans and "
                         "index lists count the sizes patched: unpatch the model and patch it again")
    if len(decoder.layers) < shape.num_layers:
        check_layers(decoder, shape)  # refuses fewer layers than the config counts
    expected = projection_shapes(shape)
    for l, layer in zip(range(shape.num_layers), decoder.layers):  # those past the config's count never run
        if not isinstance(layer, AdaptiveDecoderLayerMixin):
            raise ValueError(f"model: layer {l} of the language model was replaced by an unpatched "
                             f"{type(layer).__name__} after patch; unpatch the model and patch it again")
        for (part, name), want in zip(_PROJECTION_PATHS, expected):
            module = layer._modules[part]._modules[name]
            if type(module) is not torch.nn.Linear or module._parameters["weight"].shape != want:
                check_layers(decoder, shape)


def checked_scheduler(decoder):
    """A patched decoder's latency scheduler; ``ValueError`` unless it is on the device of the decoder's weights (a
    model patched on the meta device, then loaded from a checkpoint without the scheduler's weights, keeps it there)."""
    scheduler, device = decoder.latency_scheduler, decoder.embed_tokens.weight.device
    if scheduler.head.weight.device != device:
        raise ValueError(f"model: its latency scheduler is on {scheduler.head.weight.device}, its weights on "
                         f"{device}. Move the whole model to one device; where it was patched before its weights "
                         "were loaded, from a checkpoint without the scheduler's, patch it again with scheduler= a "
                         "save_scheduler file, or unpatch and patch it again for a seeded scheduler")
    return scheduler


def check_plan(plan, batch_size: int, shape: DecoderShape, device: torch.device) -> ExecutionPlan:
    """``ValueError`` unless ``plan`` is an ExecutionPlan for this batch and decoder on ``device``."""
    if not isinstance(plan, ExecutionPlan):
        raise ArgumentTypeError(f"execution_plan must be an adaptive_kernels.ExecutionPlan, got {type(plan).__name__}")
    masks = {"layers": plan.layers, "heads": plan.heads, "groups": plan.groups}
    for name, mask in masks.items():  # checked when made, again here: a mask may have been reassigned since
        check_bool_tensor(f"execution_plan.{name}", mask)
    expected = (batch_size, shape.num_layers, shape.num_heads)
    if not tuple(plan.heads.shape) == tuple(plan.groups.shape) == expected or plan.layers.shape != expected[:2]:
        raise ValueError(f"execution_plan has layers {tuple(plan.layers.shape)}, heads {tuple(plan.heads.shape)} and "
                         f"groups {tuple(plan.groups.shape)}; this model and batch need (batch, layers) = {expected[:2]} "
                         f"and (batch, layers, heads) = {expected}")
    for name, mask in masks.items():
        if mask.device != device:
            raise ValueError(f"execution_plan.{name} is on {mask.device}, the model's inputs on {device}; move the "
                             "plan with plan.to(device)")
    return plan


def host_budgets(budget, batch_size: int, graph_safe: bool) -> list[float]:
    """``resolve_budgets`` of a ``latency_budget``; ``ValueError`` for a tensor off the CPU where nothing may be read
    back to the host (``graph_safe``)."""
    if graph_safe and isinstance(budget, torch.Tensor) and budget.device.type != "cpu":
        raise ValueError(f"latency_budget: a tensor on {budget.device} is read back to the host to plan, which a "
                         "request within graph_safe() or a CUDA-graph capture may not do; give floats or a CPU "
                         "tensor (a capture keeps the budgets it was captured with)")
    return resolve_budgets(budget, batch_size)


def check_continuation(cache: AdaptiveCache, request, shape: DecoderShape, graph_safe: bool) -> None:
    """``ValueError`` when a call that continues ``cache`` asks for another plan or other budgets than the
    request that filled it: its keys, values and plan are that request's, and would be run regardless. The
    objects that request was given (generate passes them again at every step) are its own, their masks edited in
    place since or not; another is compared once; where nothing may be read back (``graph_safe``) a plan's shape
    and device are checked, not its masks. Also when ``cache`` was filled by a decoder of another ``shape``."""
    if cache.decoder_shape != shape:
        raise ValueError(f"{CACHE_FIELD}: the cache this call continues was filled by a decoder of another shape "
                         f"({cache.decoder_shape}) than this model's ({shape}); a cache continues the model that "
                         "filled it")
    agreed = {}  # kept only where the whole request agrees with the cache's
    for name in ("execution_plan", "latency_budget"):
        given = getattr(request, name)
        if given is None or cache.agreed.get(name) is given:
            continue
        if name == "execution_plan":
            check_plan(given, cache.batch_size, shape, cache.plan.layers.device)
            if graph_safe:
                continue
            same = given == cache.plan
            made = "another plan"
        else:
            same = cache.budgets is not None and host_budgets(given, cache.batch_size, graph_safe) == cache.budgets
            made = f"latency_budget {cache.budgets}" if cache.budgets else "no latency_budget (it has no latency token)"
        if not same:
            raise ValueError(f"{name}: the cache this call continues ({CACHE_FIELD}) was filled under {made}, "
                             "which it keeps for the whole request; give the same, or none, or start a new request")
        agreed[name] = given
    cache.agreed.update(agreed)


def _project(backend: Backend, x, linear, rows):
    """``linear`` over its rows ``rows`` (None: all), read from its weight (the module is not called)."""
    if rows is None:
        return F.linear(x, linear.weight, linear.bias)
    return backend.rows_linear(x, linear.weight, rows, linear.bias)


def _project_back(backend: Backend, a, linear, cols, batch_rows_on):
    """``linear`` over the columns ``cols`` (None: all, and the bias on every row); with ``cols`` and
    ``batch_rows_on`` [R], batch rows that are off get no bias."""
    if cols is None:
        return F.linear(a, linear.weight, linear.bias)
    y = backend.cols_linear(a, linear.weight, cols)
    if linear.bias is None:
        return y
    return y + (linear.bias if batch_rows_on is None else batch_rows_on[:, None, None] * linear.bias)


def _stacked(tensors) -> torch.Tensor | None:
    """One [sum of rows, ...] view of ``tensors`` when they lie back to back in one storage, else None."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (not t.is_contiguous() or t.dtype != first.dtype or t.shape[1:] != first.shape[1:]
                or t.storage_offset() != offset or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride())


def stacked_qkv(attn) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [Nq + 2*Nkv, D], bias or None): the q, k and v projections as one, when ``lay_out_qkv``
    laid them out back to back and nothing has copied them apart since (else None). Inference
    only: None when autograd would need the separate weights."""
    linears = (attn.q_proj, attn.k_proj, attn.v_proj)
    if torch.is_grad_enabled() and any(p.requires_grad for lin in linears for p in lin.parameters()):
        return None
    weight = _stacked([lin.weight for lin in linears])
    biases = [lin.bias for lin in linears]
    if weight is None or (any(b is None for b in biases) and any(b is not None for b in biases)):
        return None
    if biases[0] is None:
        return weight, None
    bias = _stacked(biases)
    return None if bias is None else (weight, bias)


def lay_out_qkv(decoder, stacked: bool) -> None:
    """Store each layer's q, k and v weights (and biases) back to back in one tensor (at patch time,
    so one projection reads all three: ``stacked_qkv``), or in separate tensors again. Values and
    shapes are unchanged."""
    for layer in decoder.layers:
        attn = layer.self_attn
        for name in ("weight", "bias"):
            params = [getattr(lin, name) for lin in (attn.q_proj, attn.k_proj, attn.v_proj)]
            if any(p is None for p in params):
                continue
            if stacked:
                if _stacked([p.data for p in params]) is not None:
                    continue  # already one tensor (a copy torch.load rebuilt, say)
                whole = torch.cat([p.data for p in params])
                for p, part in zip(params, whole.split([p.shape[0] for p in params])):
                    p.data = part
            else:
                for p in params:
                    p.data = p.data.clone()


def _project_qkv(backend: Backend, attn, x, idx: LayerIndices, head_dim: int):
    """(q and k side by side [R, T, nq*d + nkv*d], v [R, T, nkv*d]): one gathered product on the
    stacked weight when there is one, else three."""
    stacked = stacked_qkv(attn)
    if stacked is None:
        q, k = _project(backend, x, attn.q_proj, idx.q_rows), _project(backend, x, attn.k_proj, idx.kv_rows)
        return torch.cat([q, k], dim=-1), _project(backend, x, attn.v_proj, idx.kv_rows)
    weight, bias = stacked
    qkv = F.linear(x, weight, bias) if idx.qkv_rows is None else backend.rows_linear(x, weight, idx.qkv_rows, bias)
    return qkv.split([(idx.num_q_heads + idx.num_kv_heads) * head_dim, idx.num_kv_heads * head_dim], dim=-1)


def norm_of(backend: Backend, norm, x, residual=None):
    """``norm(x)``, or with a residual ``(norm(x + residual), x + residual)``: one backend kernel for
    Llama's RMSNorm, the module itself for any other norm."""
    if isinstance(norm, LlamaRMSNorm):
        return backend.rms_norm(x, norm.weight, norm.variance_epsilon, residual)
    if residual is None:
        return norm(x)
    h = x + residual
    return norm(h), h


def settled(x: torch.Tensor, update: torch.Tensor | None) -> torch.Tensor:
    """The hidden states ``x + update`` (``update`` None: x), with the model's rounding."""
    return x if update is None else x + update


def norm_settled(backend: Backend, norm, x, update):
    """``(norm(h), h)`` for the hidden states ``h = x (+ update)``; a pending ``update`` is added in the
    norm's kernel."""
    if update is None:
        return norm_of(backend, norm, x), x
    return norm_of(backend, norm, update, residual=x)


def update_of_no_units(x, out_proj) -> torch.Tensor:
    """The update [R, T, D] of a block none of whose units runs: ``out_proj``'s bias (zeros without one)."""
    out = x.new_zeros(x.shape)
    return out if out_proj.bias is None else out + out_proj.bias


def run_attention(attn, x, idx: LayerIndices, cos, sin, kv_valid, cache: AdaptiveCache | None, layer: int,
                  shape: DecoderShape, backend: Backend) -> torch.Tensor:
    """The attention block over the active heads: x [R, T, D] -> its update [R, T, D]."""
    R, T, _ = x.shape
    d = shape.head_dim
    if idx.num_q_heads == 0:
        return update_of_no_units(x, attn.o_proj)
    qk, v = _project_qkv(backend, attn, x, idx, d)
    qk = backend.rotary(qk.view(R, T, idx.num_q_heads + idx.num_kv_heads, d), cos, sin)
    q, k = qk[:, :, :idx.num_q_heads], qk[:, :, idx.num_q_heads:].transpose(1, 2)
    v = v.view(R, T, idx.num_kv_heads, d).transpose(1, 2)
    if cache is not None:
        k, v = cache.append(layer, k, v)
        k, v = k[:, :, :kv_valid.shape[1]], v[:, :, :kv_valid.shape[1]]  # the positions kv_valid covers
    o = backend.attention(q, k, v, idx.q_to_kv, kv_valid, attn.scaling)
    return _project_back(backend, o.reshape(R, T, -1), attn.o_proj, idx.q_rows, idx.batch_rows_on)


def run_mlp(mlp, x, idx: LayerIndices, backend: Backend) -> torch.Tensor:
    """The MLP block over the active neurons (``idx.mlp_rows`` None: all): x [R, T, D] -> its update [R, T, D]."""
    if idx.num_neurons == 0:
        return update_of_no_units(x, mlp.down_proj)
    if isinstance(mlp.act_fn, SILU_MODULES) and mlp.gate_proj.bias is None and mlp.up_proj.bias is None:
        hidden = backend.swiglu(x, mlp.gate_proj.weight, mlp.up_proj.weight, idx.mlp_rows)
    else:
        gate, up = _project(backend, x, mlp.gate_proj, idx.mlp_rows), _project(backend, x, mlp.up_proj, idx.mlp_rows)
        hidden = mlp.act_fn(gate) * up
    return _project_back(backend, hidden, mlp.down_proj, idx.mlp_rows, idx.batch_rows_on)


class AdaptiveDecoderLayerMixin:
    """Mixed into each decoder layer of a patched model; its ``forward`` runs one layer's plan."""

    def forward(self, x, idx: LayerIndices, cos, sin, kv_valid, cache, settings: Settings, update=None):
        """The layer on the R rows that execute it: hidden states ``x (+ update)`` [R, T, D] -> ``(x', mlp)``,
        whose sum ``x' + mlp`` is the layer's output. ``update``: the previous layer's MLP output, not
        yet added (None: nothing pending); the input norm adds it in its kernel."""
        backend = settings.backend
        normed, x = norm_settled(backend, self.input_layernorm, x, update)
        attn = run_attention(self.self_attn, normed, idx, cos, sin, kv_valid, cache, self.self_attn.layer_idx,
                             settings.shape, backend)
        normed, x = norm_of(backend, self.post_attention_layernorm, attn, residual=x)
        return x, run_mlp(self.mlp, normed, idx, backend)

    def forward_masked(self, x, layer_on, heads_on, neurons_on, bias_on, cos, sin, kv_valid, shape: DecoderShape):
        """The training-time masked computation of ADALLAVA.md, differentiable in the masks; x [B, T, D] -> [B, T, D].

        Float masks: ``heads_on`` [B, H] multiplies each head's attention output before o_proj,
        ``neurons_on`` [B, M] each neuron's ``act(gate)*up`` before down_proj (variant H's units), and
        ``layer_on`` [B] the layer's whole update, ``layer(x) - x`` (variant L's); ``bias_on`` [B] the
        o and down biases (so that a layer with no unit on is the identity). Every weight is read: this
        path trains, it does not save.
        """
        attn, mlp = self.self_attn, self.mlp
        B, T, _ = x.shape
        a = self.input_layernorm(x)
        q = rotary_reference(attn.q_proj(a).view(B, T, shape.num_heads, -1), cos, sin)
        k = rotary_reference(attn.k_proj(a).view(B, T, shape.num_kv_heads, -1), cos, sin)
        v = attn.v_proj(a).view(B, T, shape.num_kv_heads, -1)
        q_to_kv = dense_layer(B, shape, x.device).q_to_kv
        o = head_sparse_attention_reference(q, k.transpose(1, 2), v.transpose(1, 2), q_to_kv, kv_valid, attn.scaling)
        o = o * heads_on[:, None, :, None].to(o.dtype)
        bias_on = bias_on[:, None, None].to(x.dtype)
        attn_update = _masked_bias_linear(attn.o_proj, o.reshape(B, T, -1), bias_on)
        m = self.post_attention_layernorm(x + attn_update)
        h = mlp.act_fn(mlp.gate_proj(m)) * mlp.up_proj(m) * neurons_on[:, None, :].to(x.dtype)
        return x + layer_on[:, None, None].to(x.dtype) * (attn_update + _masked_bias_linear(mlp.down_proj, h, bias_on))


def _masked_bias_linear(linear, x, bias_on):
    """``linear(x)`` with its bias (if any) times ``bias_on`` [B, 1, 1]."""
    y = F.linear(x, linear.weight)
    return y if linear.bias is None else y + bias_on * linear.bias


def lay_out_reduction_weights(decoder, column_major: bool) -> None:
    """Store o_proj and down_proj weights column by column (once, at patch time) or back row by row.

    The kernels gather whole columns of these weights (the reduction side); column-major storage
    makes each column one contiguous run. Values and shapes are unchanged, and ``F.linear``
    accepts either layout.
    """
    for layer in decoder.layers:
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            w = linear.weight.data
            linear.weight.data = cols_major(w) if column_major else w.contiguous()


@torch.inference_mode(False)  # a cache keeps it for later calls, which may save its index lists for backward
def plan_schedule(plan: ExecutionPlan, settings: Settings, graph_safe: bool) -> Schedule:
    """``plan``'s Schedule, on a copy of its masks: index lists built on the host (``listed_schedule``), or with
    ``graph_safe`` the fixed-width one (``plan.fixed_width_schedule``) built on the plan's device with nothing
    read back to the host: in one launch of the CUDA extension under the cuda backend when the heads fit its
    ``MAX_UNITS``, else with torch ops. Its tensors are normal ones even under ``torch.inference_mode``."""
    if not graph_safe:
        return listed_schedule(plan, settings.shape)
    # a copy that later in-place edits of the caller's masks do not reach; the masks cannot be read back to be
    # checked here, so a skipped layer's heads and groups are switched off rather than refused
    on = plan.layers
    plan = ExecutionPlan._valid(on.clone(), plan.heads & on[..., None], plan.groups & on[..., None], plan.shape,
                                plan.seq_len)
    compaction = compact_plan
    if settings.backend.name == "cuda":
        from .. import cuda_ext
        if plan.num_heads <= cuda_ext.MAX_UNITS:
            compaction = cuda_ext.compact_plan
    return fixed_width_schedule(plan, settings.shape, compaction(plan, settings.shape))


def plan_from_masks(layers, heads, groups, settings: Settings, seq_len: int) -> ExecutionPlan:
    """The full plan (prefix on, then the scheduled layers' masks, nonzero = on) of the scheduler's
    masks, valid by construction (a unit is on only in a layer that is on): not checked again."""
    B, L, H, P = layers.shape[0], settings.shape.num_layers, settings.shape.num_heads, settings.units.num_prefix_layers
    on, heads_on, groups_on = unflatten_masks(torch.ones(B * L * (1 + 2 * H), dtype=torch.bool, device=layers.device),
                                              B, L, H)
    on[:, P:], heads_on[:, P:], groups_on[:, P:] = layers, heads, groups  # bool, or float: nonzero is True
    return ExecutionPlan._valid(on, heads_on, groups_on, settings.shape, seq_len)


def run_sampled_layers(layers, x, masks, variant: str, cos, sin, kv_valid, shape: DecoderShape,
                       hidden: list | None):
    """The scheduled layers in training: the masked computation under a Gumbel-sampled plan ``masks``
    (layers [B, K], heads [B, K, H], groups [B, K, H]), differentiable in them as ADALLAVA.md defines:
    variant L multiplies each layer's whole update by its layer mask, H each head's and neuron's output by
    theirs (a layer none of whose units is picked still passes gradients to them). ``hidden``: a list that
    receives x after each layer, or None."""
    layer_on, heads_on, groups_on = masks
    if variant == "L":  # every unit on; the biases belong to the update that layer_on multiplies
        heads_on, groups_on, bias_on = torch.ones_like(heads_on), torch.ones_like(groups_on), torch.ones_like(layer_on)
    else:  # no layer factor; biases where the layer runs
        layer_on, bias_on = torch.ones_like(layer_on), layer_on.detach()
    group_of_neuron = neuron_groups(shape, groups_on.shape[-1], x.device)
    for k, layer in enumerate(layers):
        neurons_on = groups_on[:, k, group_of_neuron]
        step = layer.forward_masked
        if layer.gradient_checkpointing and layer.training:  # recomputed in backward, as transformers does forward
            step = functools.partial(layer._gradient_checkpointing_func, layer.forward_masked)
        x = step(x, layer_on[:, k], heads_on[:, k], neurons_on, bias_on[:, k], cos, sin, kv_valid, shape)
        if hidden is not None:
            hidden.append(x)
    return x


def hidden_states_requested(kwargs: dict, config):
    """``output_hidden_states`` of this call (else the config's): False, True, or the indices it selects.
    ``ValueError`` for ``output_attentions``: the attention kernels form no attention weights."""
    if kwargs.get("output_attentions", config.output_attentions):
        raise ValueError("output_attentions: a patched model's attention kernels do not form attention weights; "
                         "call adaptive_kernels.unpatch(model) to get them")
    return kwargs.get("output_hidden_states", config.output_hidden_states) or False


# transformers 5.2x reads an index selection of hidden states as indices into all of them, the decoder's input
# first, negative ones too; earlier 5.x, which lacks this helper, as indices of layers whose outputs are kept
SELECTS_FROM_ALL_STATES = hasattr(importlib.import_module(OUTPUT_CAPTURING), "resolve_hidden_states_indices")


def hidden_states_output(collected: list | None, last: torch.Tensor, selection) -> tuple | None:
    """transformers' ``hidden_states`` from what was ``collected`` (None: nothing was asked for): the
    decoder's input, then each layer's output, the last one replaced by ``last`` (after the final norm).
    An index ``selection`` keeps those the installed transformers keeps, the others None: under 5.2x, an
    int or a list of indices into all states, negative ones counted from the end, others ignored; under
    earlier 5.x, a list of layers whose outputs are kept (no decoder input; the last normed only where kept),
    an int meaning all."""
    if collected is None:
        return None
    states = collected[:-1] + [last]
    if selection is True:
        return tuple(states)
    if SELECTS_FROM_ALL_STATES:
        count = len(states)
        chosen = {i % count for i in ([selection] if isinstance(selection, int) else selection) if -count <= i < count}
        return tuple(h if i in chosen else None for i, h in enumerate(states))
    if not isinstance(selection, (list, tuple, set)):  # an int, say: all of them
        return tuple(states)
    return tuple(h if i in selection else None for i, h in enumerate(states[1:]))


def in_the_weights_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype,
                         backend: str) -> tuple:
    """The decoder input and its rotary tables as a kernel ``backend`` takes them, in the weights' ``dtype`` (its
    kernels compute in one): the same values where they hold a narrower float (``inputs_embeds`` in float16 for a
    float32 model; stock computes in ``dtype`` from there too, but rounds the first norm's output to the input's
    dtype, so they agree to that rounding), else ``ValueError`` naming inputs_embeds. The torch backend takes them
    as they are, as stock does."""
    if x.dtype == dtype or backend == "torch":
        return x, cos, sin
    if torch.promote_types(x.dtype, dtype) == dtype:
        return x.to(dtype), cos.to(dtype), sin.to(dtype)
    raise ValueError(f"inputs_embeds: {x.dtype}, where the model's weights are {dtype}: the {backend} backend's "
                     f"kernels compute in one dtype; give them in {dtype}, or patch with backend='torch'")


def on_the_model_device(forward):
    """``forward`` run with the model's CUDA device current: Triton launches and CUDA-graph capture
    use the current device, which need not be the model's (a model on cuda:1)."""
    @functools.wraps(forward)
    def run(self, *args, **kwargs):
        device = self.embed_tokens.weight.device
        if device.type != "cuda":
            return forward(self, *args, **kwargs)
        with torch.cuda.device(device):
            return forward(self, *args, **kwargs)
    return run


def in_the_model_dtype(forward):
    """``forward`` run with autocast off on a backend that does not follow it: its kernels compute in the
    model's dtype, where autocast would hand them another dtype for some operands (dense products) only. The
    torch backend follows autocast, as stock does."""
    @functools.wraps(forward)
    def run(self, *args, **kwargs):
        device = self.embed_tokens.weight.device.type
        if self._ak_settings.backend.follows_autocast or not torch.is_autocast_enabled(device):
            return forward(self, *args, **kwargs)
        with torch.autocast(device, enabled=False):
            return forward(self, *args, **kwargs)
    return run


def positions_and_mask(x, position_ids, attention_mask, past: int, continued: AdaptiveCache | None):
    """Positions [B, S] of the new tokens ``x`` [B, S, D] after ``past`` cached ones, and the bool padding
    mask [B, past + S] over cached and new tokens (all True where ``attention_mask`` is None). ``continued``:
    the cache a decode call continues. Of its latency token generate's positions and mask know nothing.
    ``position_ids`` given with a mask that has the token's column count it already; given with no mask, or
    one that leaves the column out, they lack it: counted from that mask (cumsum - 1, as a generate call
    continuing the cache counts them) they lack one position, and going on from the prompt's last column
    (the later steps of the call that made the cache) the cache's ``position_shift`` (one as well, unless
    that column is padding and the prompt's positions were counted from the mask)."""
    B, S = x.shape[:2]
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("attention_mask: a patched model takes a 2-D padding mask [batch, tokens]")
    latency_index = None if continued is None else continued.latency_index
    mask = torch.ones(B, past + S, dtype=torch.bool, device=x.device) if attention_mask is None else attention_mask.bool()
    if latency_index is not None and mask.shape[1] == past + S - 1:  # put the latency token's column back
        one = torch.ones(B, 1, dtype=torch.bool, device=x.device)
        mask = torch.cat([mask[:, :latency_index], one, mask[:, latency_index:]], dim=1)
    if mask.shape != (B, past + S):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, expected {(B, past + S)} (cached plus new tokens)")
    if position_ids is None:
        return torch.arange(past, past + S, device=x.device).expand(B, S), mask
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, B) or position_ids.shape[1] != S:
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {(B, S)} or {(1, S)}: one per "
                         "new token (generate derives them from attention_mask, which needs a column per token)")
    positions = position_ids.expand(B, S)
    counts_latency_token = attention_mask is not None and attention_mask.shape[1] == past + S
    if latency_index is not None and not counts_latency_token:
        counted = mask.long().cumsum(dim=1)[:, -S:] - 1  # from the mask with the latency token's column
        positions = positions + torch.where(positions + 1 == counted, 1, continued.position_shift[:, None])
    return positions, mask


def check_fresh_cache(cache) -> None:
    """A new request's ``cache`` (not an ``AdaptiveCache`` being continued): ``ValueError`` naming it where an earlier
    call took it already (and returned its own) or it is filled."""
    if getattr(cache, "_ak_replaced", False):
        raise ValueError(f"{CACHE_FIELD}: this cache was given to an earlier call, which left it empty and "
                         f"returned its own AdaptiveCache (the output's {CACHE_FIELD}; generate's with "
                         "return_dict_in_generate=True): continue from that one")
    if cache.get_seq_length() > 0:
        raise ValueError(f"{CACHE_FIELD}: a patched model continues only the AdaptiveCache it returned, got a "
                         f"filled {type(cache).__name__}")


def with_latency_token(x, positions, mask, token) -> tuple:
    """The prompt followed by the latency token: ``(x [B, S+1, D], positions [B, S+1], mask [B, S+1],
    position_shift [B])`` from the prompt's ``x`` [B, S, D], ``positions``, ``mask`` and ``token`` [B, D]. The
    token's position is stock's for a token appended to the prompt: one past its largest, which is the last
    column's for positions by column, the last real token's for generate's (pads at 0); ``position_shift`` is
    that position minus the last column's, from which generate goes on."""
    latency_position = positions.amax(dim=1) + 1
    ones = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
    return (torch.cat([x, token[:, None]], dim=1), torch.cat([positions, latency_position[:, None]], dim=1),
            torch.cat([mask, ones], dim=1), latency_position - positions[:, -1])


class AdaptiveDecoderMixin:
    """Mixed into a patched model's language model class; replaces its ``forward``."""

    def __setstate__(self, state):
        """The state a copy (deepcopy, pickle) restores, with each layer's q, k and v weights in one tensor again
        under the kernel backends: a copy holds them apart (pickle writes their stacked tensor once for each)."""
        super().__setstate__(state)
        if self._ak_settings.backend.kernel_layout:
            lay_out_qkv(self, stacked=True)

    @can_return_tuple
    @on_the_model_device
    @in_the_model_dtype
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None,
                **kwargs):
        """The decoder over ``input_ids`` [B, S] or ``inputs_embeds`` [B, S, D] under the request the patched
        model set (``serving``): a ``latency_budget``, an ``execution_plan``, or neither (every unit
        on). With a budget the latency token is appended to the new tokens (S + 1 positions out), the prefix
        runs dense and the scheduler plans from the token's hidden state. A call that continues the
        ``AdaptiveCache`` it returned decodes under that cache's plan. Returns ``BaseModelOutputWithPast``
        with the cache (None when not caching) under ``CACHE_FIELD``; ``request.plan`` is the plan run."""
        misplaced = [name for name in ("latency_budget", "execution_plan") if kwargs.get(name) is not None]
        if misplaced:
            raise ValueError(f"{misplaced[0]} goes to the patched LLaVA model's forward or generate; its inner model "
                             "and language model take their request from there, and would run every unit")
        cache = kwargs.pop(cache_argument(kwargs), None)
        kwargs.pop("past_key_values", None)  # ignored beside a cache, as transformers ignores it
        settings: Settings = self._ak_settings
        weight = self.embed_tokens.weight
        check_backend(settings.backend.name, weight.device, weight.dtype)  # the model may have moved since patch
        in_capture = capturing(weight)
        request = current_request(self)
        wanted_hidden = hidden_states_requested(kwargs, self.config)
        x, decoding = self.embed_new_tokens(input_ids, inputs_embeds, cache, in_capture)
        B, S = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        past = cache.length if decoding else 0
        positions, mask = positions_and_mask(x, position_ids, attention_mask, past, cache if decoding else None)

        # within graph_safe() or a CUDA-graph capture nothing may wait for the device: plans become fixed-width
        # schedules
        graph_safe = runs_graph_safe(x)
        schedule, budgets = self.first_schedule(request, cache if decoding else None, B, x.device, graph_safe)
        latency_index, position_shift = None, None  # the latency token's column, and generate's shift past it
        if budgets is not None:  # the scheduler plans from the hidden state of the latency token, after the prompt
            token = checked_scheduler(self).latency_embedding(budgets).to(x.dtype)
            x, positions, mask, position_shift = with_latency_token(x, positions, mask, token)
            latency_index = S

        # no cache for a plan-only call, nor in training that samples its plan or recomputes layers in the
        # backward pass (gradient checkpointing: a recomputed layer would append its keys again). Training is
        # train mode with autograd on: without autograd (generate) nothing is sampled or checkpointed, as stock
        # checkpoints only with it
        training = self.training and torch.is_grad_enabled()
        if training and getattr(self.config, "attention_dropout", 0.0):
            raise ValueError(f"attention_dropout is {self.config.attention_dropout}: the attention kernels apply no "
                             "dropout, so a patched model trains only without it (set the text config's "
                             "attention_dropout to 0.0, as LLaVA ships it)")
        uncached_training = training and (budgets is not None or getattr(self, "gradient_checkpointing", False))
        replaced = None  # the caller's cache, where this call returns its own: marked so once it does
        if not decoding and use_cache and not request.plan_only and not uncached_training:
            replaced = cache
            cache = AdaptiveCache(settings.shape, latency_index, schedule, position_shift)
            cache.agreed = {name: getattr(request, name) for name in ("execution_plan", "latency_budget")}
        elif not decoding:
            cache = None
        if cache is not None:
            cache.reserve(past + x.shape[1])
        cos, sin = self.rotary_emb(x, positions)
        hidden = [x] if wanted_hidden is not False else None
        x, cos, sin = in_the_weights_dtype(x, cos, sin, weight.dtype, settings.backend.name)

        first = 0
        if schedule is None:  # a budget: the plan comes after the prefix
            first = settings.units.num_prefix_layers
            sampled = training and not request.plan_only
            x, masks = self.prefix_and_masks(x, budgets, cos, sin, mask, cache, hidden, sampled)
            request.plan = plan_from_masks(*masks, settings, x.shape[1])
            if request.plan_only:
                return BaseModelOutputWithPast(last_hidden_state=x)
            if sampled:
                x = self.norm(run_sampled_layers(self.layers[first:], x, masks, settings.units.variant, cos, sin, mask,
                                                 settings.shape, hidden))
                return BaseModelOutputWithPast(last_hidden_state=x,
                                               hidden_states=hidden_states_output(hidden, x, wanted_hidden))
            schedule = plan_schedule(request.plan, settings, graph_safe)
            if cache is not None:
                cache.schedule, cache.budgets = schedule, budgets
        request.plan = schedule.plan
        layers = range(first, len(self.layers))
        if decoding and S == 1:
            # one-token steps that may be replayed as a CUDA graph attend over the cache's whole capacity, unfilled
            # positions masked (the same shapes at every step); the others over the filled positions, as stock
            replayed = settings.backend.replays_decode
            kv_valid = F.pad(mask, (0, cache.capacity - mask.shape[1])) if replayed else mask
            x = self.decode_step(x, schedule, cos, sin, kv_valid, cache, hidden)
        else:
            x = self.final_norm(*self.run_layers(x, layers, schedule.layers[first:], cos, sin, mask, cache, hidden))
        if cache is not None:
            cache.length = past + x.shape[1]
            if in_capture:
                cache.record_captured(x.device)
        if replaced is not None:  # a call that failed before here leaves the caller's cache as it was
            replaced._ak_replaced = True
        return BaseModelOutputWithPast(last_hidden_state=x, **{CACHE_FIELD: cache},
                                       hidden_states=hidden_states_output(hidden, x, wanted_hidden))

    def embed_new_tokens(self, input_ids, inputs_embeds, cache, in_capture: bool) -> tuple[torch.Tensor, bool]:
        """The new tokens' embeddings [B, S, D], and whether they continue ``cache`` (an ``AdaptiveCache`` an
        earlier call filled: decoding) or begin a request. ``ValueError`` for both or neither of ``input_ids``
        and ``inputs_embeds``, for rows other than the continued cache's, for a cache that an eager call wrote last
        continued ``in_capture``, and for a prompt of no tokens; a cache made in a capture is continued eagerly from
        its latest replay (``AdaptiveCache.catch_up``); a new request's layers and cache are checked
        (``recheck_layers``, ``check_fresh_cache``)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x.shape[:2]
        if isinstance(cache, AdaptiveCache) and cache.length > 0:
            if in_capture and not cache.last_call_captured:
                raise ValueError(f"{CACHE_FIELD}: a cache that an eager call wrote last (filled it, or continued it) "
                                 "is continued inside a CUDA-graph capture, whose replays would each write the "
                                 "position captured, after positions only that eager call wrote; a patched model "
                                 "replays its decode steps as CUDA graphs itself, or capture the whole request, "
                                 "prefill included, and continue it in captures before any eager call")
            cache.catch_up()
            cache.last_call_captured = in_capture
            if B != cache.batch_size:
                raise ValueError(f"input_ids (or inputs_embeds) has {B} rows, but the cache it continues "
                                 f"({CACHE_FIELD}) holds {cache.batch_size}: a request continues with the rows it "
                                 "began with")
            return x, True
        recheck_layers(self)
        if S == 0:
            raise ValueError("input_ids (or inputs_embeds): a prompt needs at least one token")
        if cache is not None:
            check_fresh_cache(cache)
        return x, False

    def first_schedule(self, request: Request, continued: AdaptiveCache | None, batch_size: int, device,
                       graph_safe: bool) -> tuple[Schedule | None, list | None]:
        """``(schedule, budgets)`` a call starts from: the schedule of the cache it ``continued`` (checked against
        the ``request``, ``check_continuation``), of the request's ``execution_plan``, or of every unit (no
        request), with budgets None; for a ``latency_budget``, None and the budgets [B], the scheduler planning
        after the prefix. ``graph_safe``: plans become fixed-width schedules (``plan_schedule``)."""
        shape = self._ak_settings.shape
        if continued is not None:
            check_continuation(continued, request, shape, graph_safe)
            return continued.schedule, None
        if request.execution_plan is not None and request.latency_budget is not None:
            raise ValueError("give latency_budget or execution_plan, not both")
        if request.execution_plan is not None:
            plan = check_plan(request.execution_plan, batch_size, shape, device)
            return plan_schedule(plan, self._ak_settings, graph_safe), None
        if request.latency_budget is not None:
            return None, host_budgets(request.latency_budget, batch_size, graph_safe)
        full = ExecutionPlan.full(batch_size, shape.num_layers, shape.num_heads, device=device)
        return Schedule(full, [dense_layer(batch_size, shape, device)] * shape.num_layers), None

    def prefix_and_masks(self, x, budgets, cos, sin, kv_valid, cache, hidden, sample: bool) -> tuple:
        """A budget's prefill up to its plan: the prefix layers dense on every row of ``x`` [B, S, D], then the
        scheduler's masks from the last position's (the latency token's) hidden state, Gumbel-sampled with
        ``sample``: ``(x after the prefix, (layers [B, K], heads [B, K, H], groups [B, K, H]))``."""
        P, shape = self._ak_settings.units.num_prefix_layers, self._ak_settings.shape
        dense = [dense_layer(x.shape[0], shape, x.device)] * P
        x = settled(*self.run_layers(x, range(P), dense, cos, sin, kv_valid, cache, hidden))
        return x, self.latency_scheduler.select(x[:, -1], budgets, sample=sample)

    def run_layers(self, x, layer_ids, indices, cos, sin, kv_valid, cache, hidden):
        """Layers ``layer_ids`` with their ``LayerIndices`` (None: no row runs it), each on its rows;
        ``hidden``: a list that receives the hidden states after each layer, skipped ones included (None: not kept).

        Returns ``(x, update)``, the hidden states being ``x + update``: ``update`` (or None) is the
        last layer's MLP output, left for the next norm to add in its kernel (one launch fewer a layer).
        """
        update = None
        for l, idx in zip(layer_ids, indices):
            if idx is not None and idx.batch_rows is None:
                x, update = self.layers[l](x, idx, cos, sin, kv_valid, cache, self._ak_settings, update)
            elif idx is not None:  # some rows: they take the settled hidden states, and give theirs back
                x, update, rows = settled(x, update), None, idx.batch_rows
                out, mlp = self.layers[l](x[rows], idx, cos[rows], sin[rows], kv_valid[rows], cache, self._ak_settings)
                x = x.index_copy(0, rows, out + mlp)
            if hidden is not None:
                x, update = settled(x, update), None
                hidden.append(x)
        return x, update

    def final_norm(self, x, update):
        """The decoder's last norm of the hidden states ``x (+ update)``."""
        return norm_settled(self._ak_settings.backend, self.norm, x, update)[0]

    def decode_step(self, x, schedule, cos, sin, kv_valid, cache, hidden):
        """One decode token through every executed layer and the final norm: [B, 1, D] -> [B, 1, D].

        On CUDA with graphs on, the first step runs eagerly (compiling kernels), the second is captured as a
        CUDA graph and later steps replay it, until the cache outgrows its capacity (``AdaptiveCache.reserve``,
        every ``CAPACITY_STEP`` positions): then the eager step and the capture come again. A step that
        collects ``hidden`` states, and every step of the torch backend, runs eagerly.
        """
        def step(x, cos, sin, kv_valid):
            return self.final_norm(*self.run_layers(x, range(len(self.layers)), schedule.layers, cos, sin, kv_valid,
                                                    cache, hidden))

        use_graph = (self._ak_settings.cuda_graphs and self._ak_settings.backend.replays_decode and capturable(x)
                     and not torch.is_grad_enabled() and hidden is None
                     and not capturing(x))  # within a caller's capture: recorded there
        if not use_graph or not cache.warm:
            cache.warm = True
            return step(x, cos, sin, kv_valid)
        if cache.decode_graph is None:
            cache.decode_graph = DecodeGraph(step, (x, cos, sin, kv_valid), cache)
        return cache.decode_graph.replay((x, cos, sin, kv_valid), cache.length)

