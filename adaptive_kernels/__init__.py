"""adaptive_kernels: AdaLLaVA execution plans run for real on Hugging Face LLaVA models.

    import adaptive_kernels as ak
    ak.patch(model, variant="H")
    model.generate(**inputs, latency_budget=0.6)
"""

from __future__ import annotations

import torch

from .backends import BACKENDS, check_backend, default_backend, get_backend
from .errors import ArgumentTypeError, refusal
from .graphs import graph_safe
from .models import Request, Settings, serving, text_model_shape
from .models.llama import PROJECTIONS, check_layers, checked_scheduler, lay_out_qkv, lay_out_reduction_weights
from .models.llava import (changing, check_input_devices, check_llava, check_no_forward_of_its_own,
                           has_patched_decoder, is_patched, patched_language_model, swap_in, swap_out, unchanged)
from .plan import PAPER_RANK, VARIANTS, ExecutionPlan, UnitSpace, check_positive_integer, is_integer, resolve_budgets
from .scheduler import load_scheduler_weights, save_scheduler_weights, seeded_scheduler

__all__ = ["ExecutionPlan", "patch", "unpatch", "save_scheduler", "latency_embedding", "plan", "graph_safe"]
__version__ = "0.1.0"


def _options(model, variant, rank, num_prefix_layers, backend) -> tuple:
    shape = text_model_shape(model)
    if variant not in VARIANTS:
        raise refusal(isinstance(variant, str))(f"variant must be one of {VARIANTS}, got {variant!r}")
    check_positive_integer("rank", rank)
    rank = int(rank)
    if variant == "H" and shape.num_heads % rank:
        raise ValueError(f"rank must divide the {shape.num_heads} attention heads (variant H), got {rank}")
    if variant == "L":
        rank = 1  # L schedules whole layers: rank plays no part
    prefix = shape.num_layers // 2 if num_prefix_layers is None else num_prefix_layers
    if not is_integer(prefix) or not 0 <= prefix < shape.num_layers:
        raise refusal(is_integer(prefix))(
            f"num_prefix_layers must be an integer in [0, {shape.num_layers - 1}], got {num_prefix_layers!r}")
    prefix = int(prefix)
    dtype = model.model.language_model.embed_tokens.weight.dtype
    if backend is None:
        backend = default_backend(model.device, dtype)
    if backend not in BACKENDS:
        raise refusal(isinstance(backend, str))(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    check_backend(backend, model.device, dtype)
    return shape, variant, rank, prefix, backend


def patch(model, variant: str = "L", *, rank: int = PAPER_RANK, num_prefix_layers: int | None = None,
          backend: str | None = None, scheduler=None, cuda_graphs: bool = True):
    """Make ``model`` (a LlavaForConditionalGeneration) run AdaLLaVA plans; returns it.

    Per instance and idempotent. ``variant`` "L" schedules whole layers, "H" heads and MLP groups in
    units of ``rank`` (which L ignores); the first ``num_prefix_layers`` (default half, rounded down)
    always run. ``backend`` picks the ops ("torch", "triton", "cuda"; None: triton on CUDA for a
    float32, float16 or bfloat16 model, torch otherwise); one that cannot run the model is refused here.
    ``scheduler`` is a safetensors file from ``save_scheduler``; without it the scheduler gets a seeded
    initialisation, or, re-patching with the same variant, rank and prefix (another backend, say), keeps
    the one it has. ``cuda_graphs``: on CUDA, replay each request's decode step as a CUDA graph, and let
    plain greedy ``generate`` queue each step before it reads whether the last one finished
    (``generation.py``; the same ids). False: eager steps and transformers' own loop.
    """
    check_llava(model)
    if has_patched_decoder(model) and not is_patched(model):
        raise ValueError("model.model.language_model is patched already, as part of another model that shares it; "
                         "unpatch that model first, or give this one a language model of its own")
    check_no_forward_of_its_own(model)
    shape, variant, rank, prefix, backend_name = _options(model, variant, rank, num_prefix_layers, backend)
    lm = model.model.language_model
    check_layers(lm, shape)
    if not isinstance(cuda_graphs, bool):
        raise ArgumentTypeError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    units = UnitSpace(variant, shape.num_layers, prefix, shape.num_heads, rank)
    same_units = has_patched_decoder(model) and lm._ak_settings.units == units and scheduler is None
    if same_units and (lm._ak_settings.backend.name, lm._ak_settings.cuda_graphs) == (backend_name, cuda_graphs):
        return model
    if same_units:
        module = checked_scheduler(lm)  # a re-patch over the same units, with no file given, keeps its scheduler
    else:
        module = seeded_scheduler(units, shape.hidden_size)
    module = module.to(device=model.device, dtype=lm.embed_tokens.weight.dtype)
    if scheduler is not None:
        load_scheduler_weights(module, scheduler)  # before anything changes: a bad file leaves the model as it was
    settings = Settings(units, shape, get_backend(backend_name), cuda_graphs)  # so too a build of csrc/ that fails
    with changing(model):
        _restore_stock(model)
        if settings.backend.kernel_layout:  # else stock's: the torch backend projects q, k, v apart, as stock does
            lay_out_qkv(lm, stacked=True)
            lay_out_reduction_weights(lm, column_major=True)
        lm.add_module("latency_scheduler", module.train(lm.training))
        lm._ak_settings = settings
        swap_in(model)
    return model


def unpatch(model):
    """Restore the stock behaviour of a patched model exactly (a stock model is returned as is)."""
    check_llava(model)
    with changing(model):
        _restore_stock(model)
    return model


def _restore_stock(model) -> None:
    """``unpatch``'s work on a model (a stock one is left as it is)."""
    if not is_patched(model):
        return
    lm = model.model.language_model
    if has_patched_decoder(model):  # else an unpatched one was set in its place after patch: nothing to restore there
        if lm._ak_settings.backend.kernel_layout:
            _check_laid_out_projections(lm)
            lay_out_reduction_weights(lm, column_major=False)
            lay_out_qkv(lm, stacked=False)
        del lm.latency_scheduler
        del lm._ak_settings
    swap_out(model)


def _check_laid_out_projections(lm) -> None:
    """``ValueError`` naming a projection that is no longer a plain ``torch.nn.Linear`` (an adapter's wrapper set
    after patch, say), whose weight ``unpatch`` could not put back in stock's layout: refused before any layer is."""
    for l, layer in enumerate(lm.layers):
        for name in PROJECTIONS:
            module = layer.get_submodule(name)
            if type(module) is not torch.nn.Linear:
                raise ValueError(f"model: layer {l}'s {name} was replaced by a {type(module).__name__} after patch; "
                                 "unpatch puts the kernel backend's weight layout back to stock's in the patched "
                                 "Linear layers: set them back (merge an adapter into the weights) and unpatch again")


def _patched_decoder(model):
    check_llava(model)
    if not is_patched(model):
        raise ValueError("model is not patched; call adaptive_kernels.patch(model) first")
    return patched_language_model(model)


def save_scheduler(model, path) -> None:
    """Save the latency encoder and scheduler weights of a patched model (safetensors)."""
    save_scheduler_weights(checked_scheduler(_patched_decoder(model)), path)


def latency_embedding(model, budget) -> torch.Tensor:
    """The latency token's input embedding for ``budget`` (a float in (0, 1]): [hidden]."""
    count = len(budget) if isinstance(budget, (list, tuple)) else budget.numel() if isinstance(budget, torch.Tensor) else 1
    if count != 1:
        raise ValueError(f"budget must be one number in (0, 1] (one latency token's), got {count} values; call "
                         "latency_embedding once per budget")
    (value,) = resolve_budgets(budget, 1, name="budget")
    with torch.no_grad():
        return checked_scheduler(_patched_decoder(model)).latency_embedding([value])[0]


def plan(model, latency_budget=None, **inputs) -> ExecutionPlan:
    """The ExecutionPlan the scheduler picks for ``inputs`` at ``latency_budget``, without generating: the one
    ``generate`` runs for them, given their attention mask.

    Only the prefix layers and the scheduler run. ``inputs`` are the model's (input_ids,
    attention_mask, pixel_values, ...); without ``position_ids`` the positions are counted from the attention
    mask, as generate counts them (so a padded row plans as it would unpadded).
    """
    lm = _patched_decoder(model)
    if latency_budget is None:
        raise ValueError("latency_budget is required: a float in (0, 1] or one per batch row")
    if inputs.pop("execution_plan", None) is not None:
        raise ValueError("plan makes the plan a latency_budget picks; it takes no execution_plan")
    for name in ("past_key_values", "cache"):
        if inputs.get(name) is not None:
            raise ValueError(f"{name}: plan makes a new request's plan and continues no cache (the plan a cache runs "
                             "is its .plan)")
    check_input_devices(model, inputs)
    mask = inputs.get("attention_mask")
    if inputs.get("position_ids") is None and isinstance(mask, torch.Tensor):
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with unchanged(model), serving(lm, Request(latency_budget=latency_budget, plan_only=True)) as request, \
            torch.no_grad():
        model.model(**(inputs | {"use_cache": False}))  # the plan needs no cache
    return request.plan
