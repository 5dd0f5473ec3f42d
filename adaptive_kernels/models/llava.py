"""Patching a Hugging Face ``LlavaForConditionalGeneration`` instance.

Patching swaps the classes of the instance, its language model and its decoder layers for generated
subclasses, so a printed model shows ``Adaptive...`` where it was patched, another instance stays
stock, and ``unpatch`` restores the stock classes exactly. The top-level ``forward`` gains the keywords
``latency_budget`` and ``execution_plan`` (visible in its signature, as ``generate`` requires)
and hands them to the adaptive decoder for the duration of the call.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import weakref
from pathlib import Path

import torch
from transformers import Cache, DynamicCache, LlavaForConditionalGeneration

from .llama import (AdaptiveDecoderLayerMixin, AdaptiveDecoderMixin, Request, cache_argument, check_plan,
                    checked_scheduler, serving)
from ..cache import AdaptiveCache
from ..errors import ArgumentTypeError, refusal
from ..generation import greedy_running_ahead, runs_ahead
from ..plan import ExecutionPlan, resolve_budgets
from ..scheduler import save_scheduler_weights

_SUBCLASSES: dict[type, type] = {}
SCHEDULER_FILE = "latency_scheduler.safetensors"


def _extended_signature(stock_forward) -> inspect.Signature:
    """The stock signature plus keyword-only ``latency_budget`` and ``execution_plan`` (before ``**kwargs``)."""
    params = list(inspect.signature(stock_forward).parameters.values())
    var_kw = [p for p in params if p.kind == p.VAR_KEYWORD]
    plain = [p for p in params if p.kind != p.VAR_KEYWORD]
    ours = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ("latency_budget", "execution_plan")]
    return inspect.Signature(plain + ours + var_kw)


def _pad_labels(labels, inputs: dict) -> torch.Tensor:
    """Labels for the prompt plus the latency token, which predicts nothing: -100 appended. A ``ValueError``
    unless they are a tensor of the prompt's [batch, tokens] (``inputs``: forward's arguments by name)."""
    prompt = next((inputs[n] for n in ("input_ids", "inputs_embeds") if inputs.get(n) is not None), None)
    expected = None if prompt is None else tuple(prompt.shape[:2])
    is_tensor = isinstance(labels, torch.Tensor)
    if not is_tensor or (expected is not None and tuple(labels.shape) != expected):
        raise refusal(is_tensor)(
            f"labels must be a tensor of the prompt's [batch, tokens] {expected} (a latency budget appends the "
            f"latency token's -100 itself), got {tuple(labels.shape) if is_tensor else type(labels).__name__}")
    return torch.cat([labels, labels.new_full((labels.shape[0], 1), -100)], dim=1)


def _by_name(names: list[str], args: tuple, kwargs: dict) -> dict:
    """A call's arguments all by name (``names``: the positional parameters, in order); ``TypeError`` as
    Python's for too many or twice given."""
    if len(args) > len(names):
        raise TypeError(f"forward() takes {len(names)} positional arguments but {len(args)} were given")
    given = dict(zip(names, args))
    twice = sorted(given.keys() & kwargs.keys())
    if twice:
        raise TypeError(f"forward() got multiple values for argument {twice[0]!r}")
    return given | kwargs


def generate_option(kwargs: dict, model_config):
    """``option(name)``: the value of a generate option in a call given ``kwargs``, as generate merges them: the
    keyword, else the value in the ``generation_config`` given, else in the model's (``model_config``); None
    where none sets it; read as ``kwargs`` stand when asked."""
    def option(name: str):
        if name in kwargs:
            return kwargs[name]
        configs = (kwargs.get("generation_config"), model_config)
        return next((v for v in (getattr(c, name, None) for c in configs) if v is not None), None)
    return option


def _check_generation_cache(option, kwargs: dict) -> None:
    """``ValueError`` for a generate call (its ``kwargs``, ``option``: ``generate_option``) that sets a
    cache_implementation other than dynamic, or passes a cache that is neither a DynamicCache (left empty) nor an
    AdaptiveCache."""
    if option("cache_implementation") not in (None, "dynamic"):
        raise ValueError(f"cache_implementation={option('cache_implementation')!r}: a patched model keeps keys and "
                         "values in its own AdaptiveCache (executed layers and heads only, decode steps replayed "
                         "as CUDA graphs on it) and takes no other cache implementation; leave it unset")
    cache_name = cache_argument(kwargs)
    cache = kwargs.get(cache_name)
    if isinstance(cache, Cache) and not isinstance(cache, (AdaptiveCache, DynamicCache)):
        raise ValueError(f"{cache_name}: a patched model keeps keys and values in its own AdaptiveCache and takes "
                         f"no {type(cache).__name__} (transformers would shape the attention mask for it); pass "
                         "none, a DynamicCache, or the AdaptiveCache an earlier call returned")


def _request_per_sequence(args: tuple, kwargs: dict, option, latency_budget, execution_plan, shape,
                          device) -> tuple:
    """``(latency_budget, execution_plan)`` of a generate call (``args``, ``kwargs``; ``option``:
    ``generate_option``) checked against its prompts' count (where its inputs give it) for a decoder of
    ``shape`` on ``device``, before generate repeats the rows; then repeated for its beams and returned
    sequences (``_repeated_per_sequence``)."""
    prompts = next((t.shape[0] for t in (args[0] if args else kwargs.get("inputs"), kwargs.get("input_ids"),
                                         kwargs.get("inputs_embeds")) if isinstance(t, torch.Tensor)), None)
    if prompts is not None:
        if latency_budget is not None:
            latency_budget = resolve_budgets(latency_budget, prompts)
        if execution_plan is not None:
            check_plan(execution_plan, prompts, shape, device)
    copies = max(option("num_beams") or 1, option("num_return_sequences") or 1)
    if copies > 1:
        return _repeated_per_sequence(latency_budget, execution_plan, copies)
    return latency_budget, execution_plan


def _check_request_generation(option, name: str) -> None:
    """``ValueError`` for generate options that would run part of a request (``name``: its latency_budget or
    execution_plan) outside it (``option(name)``: the call's value)."""
    if option("guidance_scale") not in (None, 1):
        raise ValueError(f"{name} does not combine with guidance_scale: classifier-free guidance runs its "
                         "unconditional pass as a model call of its own, outside the request, with every unit on")


def _check_budget_generation(option) -> None:
    """``ValueError`` for generate options that cannot run a latency budget (``option(name)``: the call's
    value). The latency token follows the whole prompt at prefill, and it and the plan live in the cache."""
    if option("use_cache") is not None and not option("use_cache"):
        raise ValueError("latency_budget needs generate's use_cache=True: the plan and the latency token are "
                         "made once, at prefill, and live in the cache; without it every step would be a new prompt")
    # as transformers tells assisted decoding apart: a draft option that is set (0 included), or use_mtp true
    assisted = [name for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
                if option(name) is not None] + (["use_mtp"] if option("use_mtp") else [])
    if assisted:
        raise ValueError(f"latency_budget does not combine with assisted decoding ({assisted[0]}): its prefill feeds "
                         "draft tokens after the prompt, where the latency token must come last. To run the plan a "
                         "budget picks, pass execution_plan=adaptive_kernels.plan(model, latency_budget=..., **inputs)")
    if option("prefill_chunk_size") is not None:
        raise ValueError("latency_budget does not combine with prefill_chunk_size: the latency token follows the whole "
                         "prompt, which a budget's prefill takes in one piece")


INPUT_NAMES = ("inputs", "input_ids", "pixel_values", "attention_mask", "position_ids", "inputs_embeds", "labels")
"""The tensor inputs of forward and generate (``inputs``: generate's first) that must be on the model's device."""


def check_input_devices(model, inputs: dict) -> None:
    """``ValueError`` naming the first of ``INPUT_NAMES`` in ``inputs`` that is a tensor off ``model.device``."""
    for name in INPUT_NAMES:
        t = inputs.get(name)
        if isinstance(t, torch.Tensor) and t.device != model.device:
            raise ValueError(f"{name} is on {t.device}, but the model is on {model.device}; move the inputs "
                             f"there first (e.g. {{k: v.to(model.device) for k, v in inputs.items()}})")


def _adaptive_llava_class(stock: type) -> type:
    """``Adaptive<stock>``: ``stock`` whose forward and generate take ``latency_budget`` and ``execution_plan``."""
    if stock in _SUBCLASSES:
        return _SUBCLASSES[stock]
    positional = [p.name for p in list(inspect.signature(stock.forward).parameters.values())[1:]
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def forward(self, *args, latency_budget=None, execution_plan=None, **kwargs):
        kwargs = _by_name(positional, args, kwargs)
        check_input_devices(self, kwargs)
        lm = patched_language_model(self)
        cache = kwargs.get(cache_argument(kwargs))
        prefill = not (isinstance(cache, AdaptiveCache) and cache.length > 0)
        if latency_budget is not None and prefill and kwargs.get("labels") is not None:
            kwargs["labels"] = _pad_labels(kwargs["labels"], kwargs)
        with unchanged(self), serving(lm, Request(latency_budget=latency_budget, execution_plan=execution_plan)):
            return stock.forward(self, **kwargs)

    def generate(self, *args, latency_budget=None, execution_plan=None, **kwargs):
        settings = patched_language_model(self)._ak_settings
        check_input_devices(self, dict(zip(("inputs",), args)) | kwargs)
        if "use_cache" in kwargs and kwargs["use_cache"] is None:
            # unset, as forward reads it: stock's generate would feed every step the whole sequence and a cache
            del kwargs["use_cache"]
        option = generate_option(kwargs, self.generation_config)
        _check_generation_cache(option, kwargs)
        for name, given in (("latency_budget", latency_budget), ("execution_plan", execution_plan)):
            if given is not None:
                _check_request_generation(option, name)
        if latency_budget is not None:
            call_sets = "use_cache" in kwargs or getattr(kwargs.get("generation_config"), "use_cache", None) is not None
            if not call_sets and not self.generation_config.use_cache:  # training checkpoints often save False
                given = kwargs.get("generation_config")  # set there, so that no keyword is passed beside it
                if given is None:
                    kwargs["use_cache"] = True
                else:
                    kwargs["generation_config"] = copy.deepcopy(given)
                    kwargs["generation_config"].use_cache = True
            _check_budget_generation(option)
        latency_budget, execution_plan = _request_per_sequence(args, kwargs, option, latency_budget, execution_plan,
                                                               settings.shape, self.device)
        ours = {"latency_budget": latency_budget, "execution_plan": execution_plan}
        cache = kwargs.get(cache_argument(kwargs))
        with unchanged(self), cache.input_id_view() if isinstance(cache, AdaptiveCache) else contextlib.nullcontext():
            return stock.generate(self, *args, **kwargs, **{k: v for k, v in ours.items() if v is not None})

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        if self.model.language_model._ak_settings.cuda_graphs and runs_ahead(self, input_ids, generation_config,
                                                                             synced_gpus, streamer, model_kwargs):
            return greedy_running_ahead(self, input_ids, logits_processor, stopping_criteria, generation_config,
                                        **model_kwargs)
        return stock._sample(self, input_ids, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                             generation_config=generation_config, synced_gpus=synced_gpus, streamer=streamer,
                             **model_kwargs)

    def _get_candidate_generator(self, *args, model_kwargs, **kwargs):
        draft_kwargs = {k: v for k, v in model_kwargs.items() if k != "execution_plan"}
        return stock._get_candidate_generator(self, *args, model_kwargs=draft_kwargs, **kwargs)

    def save_pretrained(self, save_directory, is_main_process=True, state_dict=None, push_to_hub=False, *args,
                        **kwargs):
        """Stock's checkpoint of this model (its class and tensors, the scheduler's left out), and the scheduler
        beside it as ``SCHEDULER_FILE``: written first under another name, so that where it cannot be written
        nothing is, and named so once stock's files are."""
        if push_to_hub:
            raise ValueError(f"push_to_hub=True: save_pretrained would upload the folder before {SCHEDULER_FILE} is "
                             "written beside it; call model.push_to_hub(repo_id), which uploads both, or upload the "
                             "folder after saving")
        scheduler = checked_scheduler(patched_language_model(self))
        state_dict = self.state_dict() if state_dict is None else state_dict
        state_dict = {k: v for k, v in state_dict.items() if "latency_scheduler" not in k.split(".")}
        as_stock = object.__new__(stock)  # this model (its very attributes) as the stock class, whose name
        as_stock.__dict__ = self.__dict__  # config.json takes; self keeps its class for other threads' requests
        pending = None  # the scheduler, written first (where it cannot be, nothing is), named once stock's files are
        folder = Path(save_directory)
        if self.should_save_on_this_rank(is_main_process) and not folder.is_file():  # stock refuses a file
            folder.mkdir(parents=True, exist_ok=True)
            pending = folder / f".{SCHEDULER_FILE}.partial"
            try:
                if (folder / SCHEDULER_FILE).is_dir():
                    raise ValueError(f"{folder / SCHEDULER_FILE} is a folder")
                save_scheduler_weights(scheduler, pending)
            except ValueError as error:
                raise ValueError(f"save_directory={save_directory!s}: {SCHEDULER_FILE} cannot be written there, so "
                                 f"nothing was saved ({error})") from error
        try:
            result = stock.save_pretrained(as_stock, save_directory, is_main_process, state_dict, False, *args,
                                           **kwargs)
        except BaseException:
            if pending is not None:
                pending.unlink(missing_ok=True)
            raise
        if pending is not None:
            pending.replace(folder / SCHEDULER_FILE)
        return result

    forward.__signature__ = _extended_signature(stock.forward)
    forward.__doc__ = (f"{stock.__name__}.forward, plus ``latency_budget`` (a float in (0, 1] or one per row) "
                       "and ``execution_plan`` (an ExecutionPlan); see adaptive_kernels.")
    generate.__doc__ = (f"{stock.__name__}.generate, with ``latency_budget`` or ``execution_plan`` per prompt (each "
                        "beam and returned sequence runs its prompt's); needs the cache.")
    _sample.__doc__ = (f"{stock.__name__}._sample (greedy and sampling), greedy decoding queued a step ahead where "
                       "adaptive_kernels.generation.runs_ahead admits it and CUDA graphs are on.")
    _get_candidate_generator.__doc__ = (f"{stock.__name__}._get_candidate_generator, whose draft model (an "
                                        "assistant_model) gets the call's inputs without the plan: the plan is "
                                        "the verifying model's, whose layers and heads the draft need not share.")
    save_pretrained.__doc__ = (f"{stock.__name__}.save_pretrained, writing the stock checkpoint (no scheduler keys, "
                               f"the stock class in config.json) and the scheduler beside it as {SCHEDULER_FILE} "
                               "(a file for patch's scheduler=); push_to_hub=True is refused (push_to_hub uploads "
                               "both).")
    return _generated_class(stock, methods={"forward": forward, "generate": generate, "_sample": _sample,
                                            "_get_candidate_generator": _get_candidate_generator,
                                            "save_pretrained": save_pretrained})


def _repeated_per_sequence(latency_budget, execution_plan, copies: int) -> tuple:
    """``(latency_budget, execution_plan)`` for generate's ``copies`` sequences per prompt row (beams, returned
    sequences), which it makes by repeating each row: per-row budgets and plan rows each repeated ``copies``
    times, a 0-d tensor budget made a float (generate would repeat a tensor along its dim 0)."""
    if isinstance(latency_budget, (list, tuple)):
        latency_budget = [b for b in latency_budget for _ in range(copies)]
    elif isinstance(latency_budget, torch.Tensor) and latency_budget.dim() == 0:
        (latency_budget,) = resolve_budgets(latency_budget, 1)
    if isinstance(execution_plan, ExecutionPlan):
        rows = torch.arange(execution_plan.batch_size, device=execution_plan.layers.device)
        execution_plan = execution_plan.rows(rows.repeat_interleave(copies))
    return latency_budget, execution_plan


def _not_constructed(self, *args, **kwargs):
    """``__init__`` of the generated classes, which only ``patch`` hands out: built or loaded directly, one
    would be a half-patched model (stock parts, no settings)."""
    raise TypeError(f"{type(self).__name__} is made by adaptive_kernels.patch, not built or loaded itself: build or "
                    "load the stock model (LlavaForConditionalGeneration.from_pretrained(folder), say) and patch that")


def _generated_class(stock: type, mixin: type | None = None, methods: dict | None = None) -> type:
    """``Adaptive<stock>``, made once per process: ``stock`` with ``mixin``'s methods (None: none) and ``methods``
    (name -> function), made only by ``patch`` (``_not_constructed``) and pickled as ``stock`` (``_reduce_ex``)."""
    if stock not in _SUBCLASSES:
        _SUBCLASSES[stock] = type(f"Adaptive{stock.__name__}", (stock,) if mixin is None else (mixin, stock),
                                  {**(methods or {}), "__init__": _not_constructed, "__reduce_ex__": _reduce_ex,
                                   "_ak_stock_class": stock, "_ak_mixin": mixin})
    return _SUBCLASSES[stock]


def _new_adaptive(mixin: type | None, stock: type):
    """An empty instance of ``stock``'s adaptive class (``mixin`` None: the LLaVA model's), made again if this
    process has not made it yet: how pickle rebuilds a patched module, whose generated class it cannot name."""
    cls = _adaptive_llava_class(stock) if mixin is None else _generated_class(stock, mixin)
    return cls.__new__(cls)


def _reduce_ex(self, protocol):
    """Pickled as the stock class's instance would be, but rebuilt by ``_new_adaptive``."""
    return (_new_adaptive, (self._ak_mixin, self._ak_stock_class)) + tuple(self._ak_stock_class.__reduce_ex__(self, protocol)[2:])


def is_patched(model) -> bool:
    return hasattr(type(model), "_ak_stock_class")


def has_patched_decoder(model) -> bool:
    """Whether ``model``'s language model is patched: with ``model``, or, where ``model`` is stock, as part of
    another model that shares it."""
    return isinstance(model.model.language_model, AdaptiveDecoderMixin)


def patched_language_model(model):
    """The language model of the patched ``model``: ``ValueError`` where an unpatched one was set in its place after
    patching (it would run every unit, whatever the request asked)."""
    if not has_patched_decoder(model):
        raise ValueError("model.model.language_model was replaced by an unpatched one after patch; call "
                         "adaptive_kernels.patch(model) again to patch it")
    return model.model.language_model


def check_llava(model) -> None:
    """``ArgumentTypeError`` unless ``model`` is a LlavaForConditionalGeneration (patched or not)."""
    if not isinstance(model, LlavaForConditionalGeneration):
        raise ArgumentTypeError(f"model: adaptive_kernels patches transformers.LlavaForConditionalGeneration with a "
                                f"Llama-family language model; got {type(model).__name__}")


def check_no_forward_of_its_own(model) -> None:
    """``ArgumentTypeError`` where the model, its inner model or a module of its language model has a ``forward`` of
    its instance: accelerate sets one on each module it dispatches or offloads (``dispatch_model``, ``cpu_offload``,
    a ``device_map`` over several devices), and it would run in place of the patched class's."""
    lm = model.model.language_model
    modules = [("model", model), ("model.model", model.model)]
    modules += [(f"model.model.language_model.{name}".rstrip("."), module) for name, module in lm.named_modules()]
    for name, module in modules:
        if "forward" in vars(module):
            raise ArgumentTypeError(f"model: {name} has a forward of its own (accelerate sets one on the modules it "
                                    "dispatches or offloads); adaptive_kernels runs the patched classes' forward and "
                                    "reads the language model's weights itself, so it takes a model on one device, "
                                    "nothing offloaded (device_map='cuda', say)")


_CHANGES = weakref.WeakKeyDictionary()  # model -> patch and unpatch calls begun and ended on it (odd: one runs)


@contextlib.contextmanager
def changing(model):
    """Within the block ``model`` is being patched or unpatched: requests that overlap it are refused
    (``unchanged``)."""
    _CHANGES[model] = _CHANGES.get(model, 0) + 1
    try:
        yield
    finally:
        _CHANGES[model] += 1


@contextlib.contextmanager
def unchanged(model):
    """Run the block, a request of ``model``; ``ValueError`` where a patch or unpatch of it overlaps the block (in
    another thread, or called from a hook), in place of what the block returns or raises: it changes the layers in
    place, so the request would run parts of two models."""
    before = _CHANGES.get(model, 0)
    if before % 2:
        raise _overlapped()
    try:
        yield
    except Exception as error:
        if _CHANGES.get(model, 0) != before:
            raise _overlapped() from error
        raise
    if _CHANGES.get(model, 0) != before:
        raise _overlapped()


def _overlapped() -> ValueError:
    return ValueError("model: patched or unpatched while this request ran on it (in another thread, or from a hook), "
                      "which changes its layers in place; patch and unpatch between requests")


def swap_in(model) -> None:
    """Give the model, its language model and its decoder layers their adaptive classes."""
    lm = model.model.language_model
    for layer in lm.layers:
        layer.__class__ = _generated_class(type(layer), AdaptiveDecoderLayerMixin)
    lm.__class__ = _generated_class(type(lm), AdaptiveDecoderMixin)
    model.__class__ = _adaptive_llava_class(type(model))


def swap_out(model) -> None:
    """Restore the stock classes of the model, its language model and its decoder layers, leaving those that an
    unpatched module was set in place of since patching."""
    lm = model.model.language_model
    if has_patched_decoder(model):
        for layer in lm.layers:
            if isinstance(layer, AdaptiveDecoderLayerMixin):
                layer.__class__ = layer._ak_stock_class
        lm.__class__ = lm._ak_stock_class
    model.__class__ = model._ak_stock_class


def prompt_embeddings(model, inputs: dict) -> torch.Tensor:
    """The decoder input that ``model`` (stock or patched) builds for ``inputs``, image features merged: [B, S, D]."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen["embeds"]
