"""Every bad input gets a clear error naming the argument and what is accepted."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import itertools
import logging
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch.nn.utils import prune
from safetensors.torch import save_file
from transformers import (DynamicCache, GenerationConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, MistralConfig)
from transformers.utils import logging as hf_logging

import adaptive_kernels as ak
from adaptive_kernels import backends
from adaptive_kernels import ExecutionPlan
from adaptive_kernels.errors import ArgumentTypeError
from adaptive_kernels.models import text_model_shape
from adaptive_kernels.models.llama import PROJECTIONS, check_plan
from adaptive_kernels.models.llava import prompt_embeddings
from adaptive_kernels.tiny import example_inputs, tiny_llava, tiny_llava_config
from oracles import CACHE_KWARG, cache_of


@pytest.fixture(scope="module")
def model():
    return ak.patch(tiny_llava(seed=2), "H", rank=2)


@pytest.fixture(scope="module")
def inputs(model):
    return example_inputs(model, batch_size=2, seed=1)


IN_RANGE = r"latency_budget must lie in \(0, 1\]"
PER_ROW = r"latency_budget has \d values but the batch has 2 rows; give one float or one per row"


@pytest.mark.parametrize("budget,message", [(0.0, IN_RANGE), (1.01, IN_RANGE), (-0.5, IN_RANGE),
                                            (float("nan"), IN_RANGE), ([0.5], PER_ROW), ([0.5, 0.6, 0.7], PER_ROW),
                                            (torch.tensor([0.5, 2.0]), IN_RANGE)])
def test_bad_budgets(model, inputs, budget, message):
    """forward, generate and ak.plan refuse alike, naming latency_budget and what it accepts."""
    with pytest.raises(ValueError, match=message):
        model(**inputs, latency_budget=budget)
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs, latency_budget=budget, max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        ak.plan(model, latency_budget=budget, **inputs)


@pytest.mark.parametrize("inner", ["model", "language_model"])
@pytest.mark.parametrize("name", ["latency_budget", "execution_plan"])
def test_a_request_given_to_an_inner_module_is_refused(model, inputs, inner, name):
    """Stock passes unknown keywords on to the decoder, which ran every unit: the request goes to the top (None,
    no request, passes)."""
    request = {"latency_budget": 0.5, "execution_plan": ExecutionPlan.full(2, 8, 8)}[name]
    with torch.no_grad():
        model.model(**inputs, **{name: None})
    with pytest.raises(ValueError, match=f"{name} goes to the patched LLaVA model's forward or generate"):
        if inner == "model":
            model.model(**inputs, **{name: request})
        else:
            embeds = model.model.language_model.embed_tokens(inputs["input_ids"])
            model.model.language_model(inputs_embeds=embeds, **{name: request})


@pytest.mark.parametrize("budget", [[0.5, 0.6, 0.7], torch.tensor([0.5, 0.6, 0.7])])
def test_budget_rows_are_counted_per_prompt_with_beams(model, inputs, budget):
    """generate repeats each prompt for its beams: the budgets are still one per prompt, and counted so."""
    with pytest.raises(ValueError, match="latency_budget has 3 values but the batch has 2 rows"):
        model.generate(**inputs, latency_budget=budget, num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"execution_plan has layers \(1, 8\).* need .*\(2, 8, 8\)"):
        model.generate(**inputs, execution_plan=ExecutionPlan.full(1, 8, 8), num_beams=2, max_new_tokens=2)


def test_a_plan_whose_groups_were_replaced_by_another_shape_is_refused_by_name(model, inputs):
    """Checked per call, inside graph_safe() too (shapes need no read from the device)."""
    edited = ExecutionPlan.full(2, 8, 8)
    edited.groups = edited.groups[..., :4]
    for context in (contextlib.nullcontext, ak.graph_safe):
        with context(), pytest.raises(ValueError, match=r"execution_plan has .* groups \(2, 8, 4\)"):
            model(**inputs, execution_plan=edited)


def test_a_plan_whose_layers_were_replaced_by_another_shape_is_refused_by_name(model, inputs):
    """The layers mask is checked per call as the heads and groups are, inside graph_safe() too."""
    for layers in (torch.ones(2, 7, dtype=torch.bool), torch.ones(2, 9, dtype=torch.bool),
                   torch.ones(1, 8, dtype=torch.bool)):
        edited = ExecutionPlan.full(2, 8, 8)
        edited.layers = layers
        for context in (contextlib.nullcontext, ak.graph_safe):
            with context(), pytest.raises(ValueError, match=rf"execution_plan has layers \({layers.shape[0]}, "
                                                             rf"{layers.shape[1]}\)"):
                model(**inputs, execution_plan=edited)


def test_latency_embedding_takes_one_budget(model):
    for budget in ([0.5, 0.6], torch.tensor([0.5, 0.6]), []):
        with pytest.raises(ValueError, match="budget must be one number"):
            ak.latency_embedding(model, budget)
    for budget, message in [("x", "^budget must be a float"), (1.5, r"^budget must lie in \(0, 1\]"),
                            (torch.tensor(True), "^budget must be a real-valued tensor")]:
        with pytest.raises(ValueError, match=message):
            ak.latency_embedding(model, budget)
    for budget in ([0.6], torch.tensor([0.6]), torch.tensor(0.6)):
        assert torch.equal(ak.latency_embedding(model, budget), ak.latency_embedding(model, 0.6))


def test_bad_plans(model, inputs):
    with pytest.raises(ValueError, match="execution_plan"):
        model(**inputs, execution_plan=ExecutionPlan.full(2, 7, 8))
    with pytest.raises(ValueError, match="execution_plan"):
        model(**inputs, execution_plan=ExecutionPlan.full(3, 8, 8))
    for heads in (4, 16):  # the model has 8
        with pytest.raises(ValueError, match="execution_plan"):
            model(**inputs, execution_plan=ExecutionPlan.full(2, 8, heads))
    with pytest.raises(ValueError, match="execution_plan.*device"):
        check_plan(ExecutionPlan.full(2, 8, 8), 2, text_model_shape(model), torch.device("cuda"))
    with pytest.raises(ArgumentTypeError, match="execution_plan"):
        model(**inputs, execution_plan=torch.ones(2, 8, dtype=torch.bool))
    for name, reassigned in (("layers", torch.ones(2, 8)), ("heads", torch.ones(2, 8, 8, dtype=torch.int8)),
                             ("groups", None)):  # checked when the plan was made, and again when it runs
        plan = ExecutionPlan.full(2, 8, 8)
        setattr(plan, name, reassigned)
        with pytest.raises(ArgumentTypeError, match=f"^execution_plan.{name} must be a bool tensor"):
            model(**inputs, execution_plan=plan)
    plan = ExecutionPlan.full(2, 8, 8)
    plan.groups = plan.groups.to("meta")
    with pytest.raises(ValueError, match="^execution_plan.groups is on meta"):
        model(**inputs, execution_plan=plan)
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, execution_plan=ExecutionPlan.full(2, 8, 8), latency_budget=0.5)


def test_unsupported_models():
    causal_lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, vocab_size=64))
    for call in (ak.patch, ak.unpatch):  # unpatch returned a model it was not given to restore
        with pytest.raises(ArgumentTypeError, match="model: .*LlavaForConditionalGeneration"):
            call(causal_lm)
    config = tiny_llava_config()
    mistral = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=512)
    llava_mistral = LlavaForConditionalGeneration(LlavaConfig(vision_config=config.vision_config, text_config=mistral,
                                                              image_token_id=511))
    with pytest.raises(ArgumentTypeError, match="model: .*llama"):
        ak.patch(llava_mistral)


class _ScaledLinear(torch.nn.Linear):  # a torch.nn.Linear subclass whose forward is not F.linear over its weight
    def forward(self, x):
        return 2 * super().forward(x)


class _Adapter(torch.nn.Module):  # stands for a LoRA-wrapped projection: the base layer plus a delta
    def __init__(self, base):
        super().__init__()
        self.base_layer, self.delta = base, torch.nn.Linear(base.in_features, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.delta(x)


def test_a_model_with_fewer_layers_than_its_config_says_is_refused():
    """Plans count the config's layers: a plan's missing layers were silently not run, and its cost counted them."""
    model = tiny_llava()
    del model.model.language_model.layers[3]
    with pytest.raises(ValueError, match="has 7 decoder layers, its config num_hidden_layers=8"):
        ak.patch(model)
    assert type(model) is LlavaForConditionalGeneration  # refused before anything changed


@pytest.mark.parametrize("wrap", ["adapter", "float8", "pruned", "hooked", "subclass"])
def test_projections_the_executor_cannot_read_are_refused(wrap):
    """The executor reads projection weights itself: a wrapped, quantised or hooked one would be computed wrong."""
    model = tiny_llava()
    mlp = model.model.language_model.layers[1].mlp
    if wrap == "adapter":
        mlp.up_proj = _Adapter(mlp.up_proj)
    elif wrap == "float8":
        mlp.up_proj.to(torch.float8_e4m3fn)
    elif wrap == "subclass":  # plain torch.nn.Linear only: a subclass may compute anything in its forward
        mlp.up_proj.__class__ = _ScaledLinear
    elif wrap == "pruned":  # the mask is applied by a forward pre-hook
        prune.random_unstructured(mlp.up_proj, "weight", amount=0.5)
    else:
        mlp.up_proj.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(ArgumentTypeError, match="layer 1's mlp.up_proj"):
        ak.patch(model)
    assert type(model) is LlavaForConditionalGeneration  # refused before anything changed


@pytest.mark.parametrize("layer", [1, 7])  # the last one too
@pytest.mark.parametrize("part,name", [("self_attn", "q_proj"), ("mlp", "down_proj")])
def test_a_projection_swapped_in_after_patch_is_refused_by_the_next_request(part, name, layer):
    """An adapter's wrapper put in after patch (as peft injects one) was read as its base weight alone, its delta
    silently lost: each request's prefill now refuses it as patch does. A plain Linear swapped in runs, with its
    own weights."""
    stock = tiny_llava(seed=2)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    inputs = example_inputs(model, batch_size=2, seed=1)
    parent = model.model.language_model.layers[layer].get_submodule(part)
    base = getattr(parent, name)
    setattr(parent, name, _Adapter(base))
    for request in (lambda: model(**inputs, latency_budget=0.6), lambda: model.generate(**inputs, max_new_tokens=2),
                    lambda: ak.plan(model, latency_budget=0.6, **inputs)):
        with pytest.raises(ArgumentTypeError, match=f"layer {layer}'s {part}.{name} is a _Adapter"):
            request()
    replacement = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)  # random weights
    setattr(parent, name, replacement)
    setattr(stock.model.language_model.layers[layer].get_submodule(part), name, copy.deepcopy(replacement))
    with torch.no_grad():
        ours = model(**inputs, execution_plan=ExecutionPlan.full(2, 8, 8)).logits
        assert torch.equal(ours, stock(**inputs).logits)


def _prune_layer_2(model, what: str) -> tuple[str, tuple]:
    """Layer 2 cut to half its neurons, or half its query and key/value heads, as structured pruning leaves it (plain
    Linear layers of other sizes, or weights of other shapes set in place, both of which stock runs); returns the
    first projection changed, in PROJECTIONS' order, and its new weight shape."""
    config = model.config.text_config
    D, M, d = config.hidden_size, config.intermediate_size, config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads // 2 * d, config.num_key_value_heads // 2 * d
    sizes = ({"self_attn.q_proj": (q, D), "self_attn.k_proj": (kv, D), "self_attn.v_proj": (kv, D),
              "self_attn.o_proj": (D, q)} if what == "heads" else
             {"mlp.gate_proj": (M // 2, D), "mlp.up_proj": (M // 2, D), "mlp.down_proj": (D, M // 2)})
    layer = model.model.language_model.layers[2]
    for path, (rows, cols) in sizes.items():
        part, name = path.split(".")
        if what == "neurons in place":
            layer.get_submodule(path).weight.data = torch.randn(rows, cols)
        else:
            setattr(layer.get_submodule(part), name, torch.nn.Linear(cols, rows, bias=False))
    return next(iter(sizes.items()))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("what", ["neurons", "heads", "neurons in place"])
def test_a_layer_pruned_to_other_sizes_is_refused_at_patch_and_by_the_next_request(what, backend):
    """Plans count heads and neurons by the config, the same in every layer. A layer pruned after patch ran plans
    past the ends of its weights (Triton read outside them, torch failed in a broadcast), and all units on in one of
    fewer heads failed in a reshape: refused at patch and by every request, naming the layer and both shapes."""
    model = tiny_llava(seed=12)
    path, shape = _prune_layer_2(model, what)
    pruned = re.escape(f"model: layer 2's {path} weight is {shape}, but the config's sizes")
    with pytest.raises(ValueError, match=pruned):
        ak.patch(model, "H", rank=2, backend=backend)
    assert type(model) is LlavaForConditionalGeneration
    model = ak.patch(tiny_llava(seed=12), "H", rank=2, backend=backend)
    _prune_layer_2(model, what)
    inputs = example_inputs(model, batch_size=1, seed=13)
    for request in (lambda: model(**inputs), lambda: model(**inputs, latency_budget=0.6),
                    lambda: ak.plan(model, latency_budget=0.6, **inputs)):
        with torch.no_grad(), pytest.raises(ValueError, match=pruned):
            request()


def test_a_stock_layer_appended_past_the_configs_count_after_patch_runs_nowhere_as_in_stock():
    """Stock runs the config's num_hidden_layers layers; one appended after patch is not run, nor refused."""
    stock = tiny_llava(seed=17)
    inputs = example_inputs(stock, batch_size=1, seed=18)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    with torch.no_grad():
        want = model(**inputs, latency_budget=0.6).logits
        for m in (model, stock):
            m.model.language_model.layers.append(copy.deepcopy(stock.model.language_model.layers[0]))
        assert torch.equal(model(**inputs, latency_budget=0.6).logits, want)
        assert torch.equal(model(**inputs).logits, stock(**inputs).logits)


def test_a_decoder_layer_replaced_by_a_stock_one_after_patch_is_refused_until_patched_again():
    """A stock layer set in place of a patched one failed with a TypeError from its forward (where a plan ran the
    layer), and unpatch then failed half done, leaving a model neither patch nor unpatch took. Requests are refused
    naming the layer; unpatch gives stock, and patching again the patched model."""
    stock = tiny_llava(seed=14)
    inputs = example_inputs(stock, batch_size=1, seed=15)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    model.model.language_model.layers[2] = copy.deepcopy(stock.model.language_model.layers[2])
    replaced = re.escape("model: layer 2 of the language model was replaced by an unpatched LlamaDecoderLayer after "
                         "patch; unpatch the model and patch it again")
    for request in (lambda: model(**inputs), lambda: model(**inputs, latency_budget=0.6),
                    lambda: model.generate(**inputs, latency_budget=0.6, max_new_tokens=2)):
        with torch.no_grad(), pytest.raises(ValueError, match=replaced):
            request()
    ak.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock(**inputs).logits)
        ak.patch(model, "H", rank=2)
        want = ak.patch(copy.deepcopy(stock), "H", rank=2)(**inputs, latency_budget=0.6).logits
        assert torch.equal(model(**inputs, latency_budget=0.6).logits, want)


@pytest.mark.parametrize("edit", ["layers deleted", "config's count lowered"])
def test_layers_counted_otherwise_after_patch_are_refused_until_patched_again(edit):
    """Plans and index lists count the layers patched: layers deleted after patch were silently not run where a
    plan ran them, and a text config's num_hidden_layers lowered after patch (stock then runs that many layers) was
    ignored. Requests are refused naming the counts; unpatch gives stock, and patching again the patched model of
    the layers counted."""
    stock = tiny_llava(seed=16)
    inputs = example_inputs(stock, batch_size=1, seed=17)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    for m in (model, stock):
        if edit == "layers deleted":
            del m.model.language_model.layers[6:]
        else:
            m.config.text_config.num_hidden_layers = 6
    refused = ("has 6 decoder layers, its config num_hidden_layers=8" if edit == "layers deleted" else
               re.escape("model: its text config gives DecoderShape(num_layers=6, ") + ".* but it was patched at "
               + re.escape("DecoderShape(num_layers=8, ") + ".*unpatch the model and patch it again")
    plan = ExecutionPlan.full(1, 8, 8)
    for request in (lambda: model(**inputs), lambda: model(**inputs, latency_budget=0.6),
                    lambda: model(**inputs, execution_plan=plan),
                    lambda: model.generate(**inputs, latency_budget=0.6, max_new_tokens=2)):
        with torch.no_grad(), pytest.raises(ValueError, match=refused):
            request()
    ak.unpatch(model)
    for m in (model, stock):  # both counts 6 from here
        del m.model.language_model.layers[6:]
        m.config.text_config.num_hidden_layers = 6
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock(**inputs).logits)
        ak.patch(model, "H", rank=2)
        want = ak.patch(copy.deepcopy(stock), "H", rank=2)(**inputs, latency_budget=0.6).logits
        assert torch.equal(model(**inputs, latency_budget=0.6).logits, want)


def test_a_scheduler_left_on_the_meta_device_is_refused_naming_what_to_do(tmp_path):
    """A model patched on the meta device, then loaded from a stock checkpoint (which holds no scheduler weights),
    kept its scheduler there: a budget failed deep in torch, latency_embedding returned a meta tensor, and
    save_pretrained failed after writing the model's shards. Each use of the scheduler is refused naming both
    devices, before anything is written; patched again with a saved scheduler, the model gives what a model patched
    after loading does."""
    stock = tiny_llava(seed=18)
    inputs = example_inputs(stock, batch_size=1, seed=19)
    loaded_first = ak.patch(copy.deepcopy(stock), "H", rank=2)
    ak.save_scheduler(loaded_first, tmp_path / "scheduler.safetensors")
    with pytest.importorskip("accelerate").init_empty_weights():  # the parameters on meta, the buffers not
        model = LlavaForConditionalGeneration(stock.config).eval()
    ak.patch(model, "H", rank=2)
    model.load_state_dict(stock.state_dict(), strict=False, assign=True)
    refused = re.escape("model: its latency scheduler is on meta, its weights on cpu")
    for use in (lambda: model(**inputs, latency_budget=0.6), lambda: ak.plan(model, latency_budget=0.6, **inputs),
                lambda: model.generate(**inputs, latency_budget=0.6, max_new_tokens=2),
                lambda: ak.latency_embedding(model, 0.6), lambda: ak.save_scheduler(model, tmp_path / "again"),
                lambda: model.save_pretrained(tmp_path / "checkpoint"),
                lambda: ak.patch(model, "H", rank=2, cuda_graphs=False)):  # a re-patch keeps its scheduler
        with torch.no_grad(), pytest.raises(ValueError, match=refused):
            use()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scheduler.safetensors"]
    ak.patch(model, "H", rank=2, scheduler=tmp_path / "scheduler.safetensors")
    with torch.no_grad():
        want = loaded_first(**inputs, latency_budget=0.6).logits
        assert torch.equal(model(**inputs, latency_budget=0.6).logits, want)


@pytest.mark.triton
def test_unpatch_refuses_a_projection_wrapped_after_patch_before_changing_any_layer():
    """The kernel backends lay weights out at patch; unpatch lays them back. With a projection wrapped after patch
    (as an adapter library does) it failed half-way on an AttributeError, o and down of the layers before put back,
    q, k and v still stacked. Refused before any layer changes, naming the projection; unwrapped, the model serves
    a budget as before (the refused unpatch was left counted as a change under way, refusing every request), and
    unpatch gives stock."""
    stock = tiny_llava(seed=26)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="triton")
    inputs = example_inputs(stock, batch_size=1, seed=27)
    with torch.no_grad():
        served = model(**inputs, latency_budget=0.6).logits
    layers = model.model.language_model.layers
    before = {k: (v.clone(), v.stride()) for k, v in model.state_dict().items()}
    down = layers[7].mlp.down_proj
    layers[7].mlp.down_proj = torch.nn.Sequential(down)
    with pytest.raises(ValueError, match=re.escape("model: layer 7's mlp.down_proj was replaced by a Sequential")):
        ak.unpatch(model)
    layers[7].mlp.down_proj = down
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].stride() == stride for k, (v, stride) in before.items())
    with torch.no_grad():
        assert torch.equal(model(**inputs, latency_budget=0.6).logits, served)
    ak.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock(**inputs).logits)


def test_a_backend_that_fails_to_build_leaves_the_patched_model_as_it_was(monkeypatch):
    """patch unpatched the model before building the backend asked for (backend="cuda" compiles csrc/ there, which
    fails without a CUDA toolchain): the model was left stock, its scheduler lost. The backend is built first."""
    stock = tiny_llava(seed=20)
    inputs = example_inputs(stock, batch_size=1, seed=21)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    with torch.no_grad():
        model.model.language_model.latency_scheduler.head.weight.mul_(3)  # trained, say
        want = model(**inputs, latency_budget=0.6).logits

    def failing_build(name):
        raise RuntimeError(f"backend={name!r}: no CUDA toolchain")

    monkeypatch.setattr(ak, "get_backend", failing_build)
    with pytest.raises(RuntimeError, match="no CUDA toolchain"):
        ak.patch(model, "H", rank=2, cuda_graphs=False)  # the same units: a re-patch that keeps the scheduler
    with torch.no_grad():
        assert torch.equal(model(**inputs, latency_budget=0.6).logits, want)


def test_a_refused_continuation_leaves_the_cache_as_it_was():
    """A call continuing a cache with a plan equal to the cache's and another budget was refused, but the plan was
    kept as agreed: edited in place later, it was no longer compared, and a call with it ran the cache's plan. The
    cache keeps what a call agrees to only where the whole call agrees."""
    model = ak.patch(tiny_llava(seed=22), "H", rank=2)
    inputs = example_inputs(model, batch_size=2, seed=23)
    with torch.no_grad():
        out = model(**inputs, latency_budget=0.6)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = cache_of(out)
        mine = copy.deepcopy(cache.plan)  # equal to the cache's
        with pytest.raises(ValueError, match=r"latency_budget: the cache this call continues .* latency_budget \[0.6"):
            model(input_ids=token, execution_plan=mine, latency_budget=0.9, **{CACHE_KWARG: cache})
        mine.layers[:, -1], mine.heads[:, -1], mine.groups[:, -1] = True, True, True  # now another plan
        assert mine != cache.plan
        with pytest.raises(ValueError, match="execution_plan: the cache this call continues .* another plan"):
            model(input_ids=token, execution_plan=mine, **{CACHE_KWARG: cache})


def test_plan_refuses_a_cache_and_leaves_it_as_it_was():
    """ak.plan given a filled cache continued it: it wrote the given tokens into it and returned the cache's plan.
    A plan is a new request's: refused, naming the argument, the cache untouched."""
    model = ak.patch(tiny_llava(seed=24), "H", rank=2)
    inputs = example_inputs(model, batch_size=1, seed=25)
    with torch.no_grad():
        cache = cache_of(model(**inputs, latency_budget=0.6))
    length, keys = cache.length, [k.clone() for k in cache.keys if k is not None]
    with pytest.raises(ValueError, match=f"^{CACHE_KWARG}: plan makes a new request's plan and continues no cache"):
        ak.plan(model, latency_budget=0.6, **inputs, **{CACHE_KWARG: cache})
    assert cache.length == length
    assert all(torch.equal(a, b) for a, b in zip(keys, [k for k in cache.keys if k is not None], strict=True))


@pytest.mark.parametrize("how,where", [("cpu_offload", "model"), ("dispatch_model", "model"),
                                       ("by hand", "model.model.language_model.layers.1"), ("by hand", "model.model")])
def test_a_model_with_forwards_of_its_instances_is_refused_at_patch_time(how, where, tmp_path):
    """accelerate's hooks are no registered hooks: it sets a forward on each instance it dispatches or offloads,
    which ran in place of the patched classes' (a TypeError from a stock layer's forward, the budget reported
    misplaced), or left the executor reading weights still on the meta device."""
    model = tiny_llava(seed=16, num_layers=4)
    if how == "cpu_offload":
        pytest.importorskip("accelerate").cpu_offload(model, execution_device=torch.device("cpu"))
    elif how == "dispatch_model":
        kept = ("model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens",
                "model.language_model.norm", "model.language_model.rotary_emb", "lm_head")
        device_map = {name: "cpu" for name in kept} | {f"model.language_model.layers.{i}": "cpu" if i < 2 else "disk"
                                                      for i in range(4)}
        pytest.importorskip("accelerate").dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    else:
        module = model.get_submodule(where.removeprefix("model").removeprefix("."))
        module.forward = functools.partial(type(module).forward, module)
    with pytest.raises(ArgumentTypeError, match=re.escape(f"model: {where} has a forward of its own (accelerate sets "
                                                          "one on the modules it dispatches or offloads)")):
        ak.patch(model, "H", rank=2)
    assert type(model) is LlavaForConditionalGeneration


@pytest.mark.parametrize("where,hook", [("", "register_forward_hook"), ("self_attn", "register_forward_pre_hook"),
                                        ("mlp", "register_forward_hook"),
                                        ("post_attention_layernorm", "register_full_backward_hook")])
def test_hooks_in_a_decoder_layer_are_refused(where, hook):
    """Stock calls hooks on a layer and its parts; the executor runs attention, MLP and norms itself (and a layer
    hands the next one its pending update), so such a hook would be skipped or see other values."""
    model = tiny_llava()
    layer = model.model.language_model.layers[2]
    getattr(layer.get_submodule(where), hook)(lambda *args: None)
    with pytest.raises(ArgumentTypeError, match=f"layer 2{'.s ' + where if where else ''} has hooks"):
        ak.patch(model)
    assert type(model) is LlavaForConditionalGeneration  # refused before anything changed


def test_a_hook_on_the_final_norm_is_refused():
    """The executor runs the language model's final norm itself (the last layer's update added in its kernel), so a
    hook there would not be called: with every unit on the logits would not be stock's."""
    model = tiny_llava()
    model.model.language_model.norm.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(ArgumentTypeError, match="final norm has hooks"):
        ak.patch(model)
    assert type(model) is LlavaForConditionalGeneration  # refused before anything changed


def test_hooks_put_on_projections_and_norms_after_patching_are_not_called(inputs):
    """The executor reads projection and norm weights itself: hooks put on those modules after patching are not
    called at inference, under any plan. The projections of a layer that ran every unit were called as modules,
    so whether such a hook ran (and changed the result) hung on the plan."""
    model = ak.patch(tiny_llava(seed=2), "H", rank=2)
    calls = []
    for layer in model.model.language_model.layers:
        for name in (*PROJECTIONS, "input_layernorm", "post_attention_layernorm"):
            layer.get_submodule(name).register_forward_pre_hook(lambda module, args: calls.append(module))
    with torch.no_grad():
        model(**inputs)
        model(**inputs, latency_budget=[0.6, 1.0])
        model.generate(**inputs, latency_budget=0.8, max_new_tokens=2, do_sample=False)
    assert not calls


def test_the_output_capturing_hooks_of_transformers_do_not_stop_patch():
    """A stock call with hidden states puts transformers' output-capturing hooks on every layer, for good; they
    record only inside a stock forward, so a model that carries them patches and computes as one that does not."""
    carrying, fresh = tiny_llava(seed=4), tiny_llava(seed=4)
    inputs = example_inputs(carrying, batch_size=2, seed=6)
    with torch.no_grad():
        carrying(**inputs, output_hidden_states=True)
    assert carrying.model.language_model.layers[0]._forward_hooks  # what this test is about
    ours, want = (ak.patch(m, "H", rank=2) for m in (carrying, fresh))
    with torch.no_grad():
        out, ref = (m(**inputs, latency_budget=0.6, output_hidden_states=True) for m in (ours, want))
    assert torch.equal(out.logits, ref.logits)
    for got, expected in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert torch.equal(got, expected)


ACCEPTED = {"variant": "variant must be one of ('L', 'H')", "rank": "rank must be a positive integer",
            "num_prefix_layers": "num_prefix_layers must be an integer in [0, 7]",
            "backend": "backend must be one of ('torch', 'triton', 'cuda') or None",
            "cuda_graphs": "cuda_graphs must be True or False"}


@pytest.mark.parametrize("kwargs,message", [
    ({"variant": "X"}, ACCEPTED["variant"]), ({"variant": "H", "rank": 3}, "rank must divide the 8 attention heads"),
    ({"rank": 0}, ACCEPTED["rank"]), ({"num_prefix_layers": 8}, ACCEPTED["num_prefix_layers"]),
    ({"num_prefix_layers": -1}, ACCEPTED["num_prefix_layers"]), ({"backend": "jax"}, ACCEPTED["backend"]),
    pytest.param({"backend": "cuda"}, "backend='cuda' runs CUDA kernels, but the model is on cpu",
                 marks=pytest.mark.triton)])
def test_bad_patch_options(kwargs, message):
    """A value out of range: a ValueError that names the argument and what it accepts."""
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        ak.patch(tiny_llava(), **kwargs)
    assert not isinstance(refused.value, TypeError)  # a value out of range, not a wrong type


@pytest.mark.parametrize("kwargs", [{"variant": 1}, {"rank": "2"}, {"rank": 2.0}, {"rank": True},
                                    {"num_prefix_layers": "3"}, {"num_prefix_layers": True}, {"backend": 3},
                                    {"cuda_graphs": 1}, {"cuda_graphs": None}])
def test_patch_options_of_a_wrong_type(kwargs):
    """README: an argument of the wrong type raises ArgumentTypeError (a TypeError and a ValueError), naming the
    argument and what it accepts."""
    model = tiny_llava()
    [name] = kwargs
    with pytest.raises(ArgumentTypeError, match=re.escape(ACCEPTED[name])):
        ak.patch(model, **kwargs)
    assert type(model) is LlavaForConditionalGeneration  # refused before anything changed


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_kernel_backend_without_the_triton_package_is_refused_at_patch_time(monkeypatch, backend):
    """Where triton is missing (pip installs it on Linux only) the kernel backends are refused by name, before
    anything changed."""
    monkeypatch.setattr(backends, "HAS_TRITON", False)
    model = tiny_llava()
    with pytest.raises(ValueError, match=re.escape(f"backend='{backend}' needs the triton package, which is not "
                                                   "installed; use backend='torch'")):
        ak.patch(model, backend=backend)
    assert type(model) is LlavaForConditionalGeneration


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_kernel_backend_refuses_a_dtype_its_kernels_do_not_take(backend):
    model = tiny_llava().double()
    with pytest.raises(ValueError, match=f"backend='{backend}' computes in float32, float16 or bfloat16.*float64"):
        ak.patch(model, backend=backend)
    assert type(model) is LlavaForConditionalGeneration  # refused before anything changed


@pytest.mark.triton
def test_triton_on_the_cpu_outside_the_interpreter_is_refused_at_patch_time(monkeypatch):
    monkeypatch.setattr(backends, "INTERPRET", False)
    with pytest.raises(ValueError, match="backend='triton'.*TRITON_INTERPRET=1"):
        ak.patch(tiny_llava(), backend="triton")


@pytest.mark.triton
def test_triton_in_bfloat16_on_the_cpu_is_refused_at_patch_time(monkeypatch):
    """Triton's interpreter computes bfloat16 wrong (DESIGN.md): refused rather than run to wrong tokens."""
    monkeypatch.setattr(backends, "INTERPRET", True)
    model = tiny_llava().to(torch.bfloat16)
    with pytest.raises(ValueError, match="backend='triton'.*bfloat16 arithmetic is wrong"):
        ak.patch(model, backend="triton")
    assert type(model) is LlavaForConditionalGeneration


@pytest.mark.triton
@pytest.mark.parametrize("dtype,message", [(torch.bfloat16, "bfloat16 arithmetic is wrong"),
                                           (torch.float64, "computes in float32, float16 or bfloat16")])
def test_a_triton_model_moved_to_a_dtype_it_cannot_run_is_refused_at_the_next_call(monkeypatch, dtype, message):
    """Patching checks the backend against the model's dtype; a move after patching is checked per call (in
    bfloat16 the interpreter had returned wrong logits)."""
    monkeypatch.setattr(backends, "INTERPRET", True)
    model = ak.patch(tiny_llava(), "H", rank=2, backend="triton").to(dtype)
    inputs = example_inputs(model, batch_size=1, seed=3)
    with pytest.raises(ValueError, match=f"backend='triton'.*{message}"):
        model(**inputs)
    with pytest.raises(ValueError, match=f"backend='triton'.*{message}"):
        model.generate(**inputs, latency_budget=0.6, max_new_tokens=2)


@pytest.mark.parametrize("has_triton", [True, False], ids=["triton installed", "triton missing"])
def test_the_default_backend_is_triton_only_for_cuda_models_in_a_kernel_dtype_where_triton_is_installed(
        monkeypatch, has_triton):
    monkeypatch.setattr(backends, "HAS_TRITON", has_triton)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert backends.default_backend(cuda, torch.bfloat16) == ("triton" if has_triton else "torch")
    assert backends.default_backend(cuda, torch.float64) == "torch"
    assert backends.default_backend(cpu, torch.float32) == "torch"


@pytest.mark.triton
def test_patch_takes_the_default_backends_choice_for_the_models_device_and_dtype(monkeypatch):
    """backend=None is default_backend's answer for the model's device and dtype (triton on CUDA in a kernel
    dtype; on the CPU torch), asked here of a stand-in that answers triton, which the interpreter runs."""
    monkeypatch.setattr(backends, "INTERPRET", True)
    asked = []

    def answer(device, dtype):
        asked.append((device, dtype))
        return "triton"

    monkeypatch.setattr(ak, "default_backend", answer)
    model = ak.patch(tiny_llava().half(), "H", rank=2)
    assert asked == [(torch.device("cpu"), torch.float16)]
    assert model.model.language_model._ak_settings.backend.name == "triton"


def test_latency_embedding_is_a_value_without_autograd(model):
    """The embedding is returned as a value, with autograd on and the encoder's weights trainable: no graph
    to the weights (which a later backward would reach), and it converts to NumPy as it is."""
    assert torch.is_grad_enabled()
    scheduler = model.model.language_model.latency_scheduler
    assert all(p.requires_grad for p in scheduler.parameters())
    embedding = ak.latency_embedding(model, 0.6)
    assert not embedding.requires_grad and embedding.grad_fn is None
    with torch.no_grad():
        want = ak.latency_embedding(model, 0.6)
    np.testing.assert_array_equal(embedding.numpy(), want.numpy())


def test_api_on_an_unpatched_model():
    stock = tiny_llava()
    for call in (lambda: ak.save_scheduler(stock, "x.safetensors"), lambda: ak.latency_embedding(stock, 0.5),
                 lambda: ak.plan(stock, latency_budget=0.5, **example_inputs(stock))):
        with pytest.raises(ValueError, match="not patched"):
            call()


def test_plan_needs_a_budget(model, inputs):
    with pytest.raises(ValueError, match="latency_budget is required"):
        ak.plan(model, **inputs)
    with pytest.raises(ValueError, match="no execution_plan"):
        ak.plan(model, latency_budget=0.6, execution_plan=ExecutionPlan.full(2, 8, 8), **inputs)
    assert ak.plan(model, latency_budget=0.6, execution_plan=None, **inputs) == ak.plan(model, latency_budget=0.6, **inputs)


def test_plans_of_other_types_are_refused_by_type(model):
    layers, heads = torch.ones(2, 8, dtype=torch.bool), torch.ones(2, 8, 8, dtype=torch.bool)
    for bad in (heads.float(), heads.numpy(), heads.tolist()):
        with pytest.raises(ArgumentTypeError, match="ExecutionPlan.groups must be a bool tensor"):
            ExecutionPlan(layers, heads, bad)
    with pytest.raises(ValueError, match="ExecutionPlan.layers must be a bool tensor with 2 dims, got 3"):
        ExecutionPlan(heads, heads, heads)


def test_inputs_off_the_model_device_are_refused_by_name(model, inputs):
    """The meta device stands for another device: each input is named, in every entry point."""
    for name in ("input_ids", "attention_mask", "pixel_values"):
        moved = inputs | {name: inputs[name].to("meta")}
        for call in (lambda: model(**moved, latency_budget=0.6), lambda: model(**moved),
                     lambda: model.generate(**moved, latency_budget=0.6, max_new_tokens=2),
                     lambda: ak.plan(model, latency_budget=0.6, **moved)):
            with pytest.raises(ValueError, match=f"{name} is on meta, but the model is on cpu"):
                call()
    with pytest.raises(ValueError, match="latency_budget is a meta tensor"):
        model(**inputs, latency_budget=torch.tensor([0.5, 0.6], device="meta"))


@pytest.mark.parametrize("name", ["input_ids", "pixel_values", "attention_mask"])
def test_inputs_off_the_model_device_passed_positionally_are_refused_by_name(model, inputs, name):
    """Passed by position (forward's order: input_ids, pixel_values, attention_mask), an input is still named."""
    moved = inputs | {name: inputs[name].to("meta")}
    args = [moved[n] for n in ("input_ids", "pixel_values", "attention_mask")]
    for call in (lambda: model(*args, latency_budget=0.6), lambda: model(*args),
                 lambda: model(*args[:2], attention_mask=args[2], latency_budget=0.6)):
        with pytest.raises(ValueError, match=f"{name} is on meta, but the model is on cpu"):
            call()
    if name == "input_ids":  # generate's first parameter is called inputs
        with pytest.raises(ValueError, match="inputs is on meta, but the model is on cpu"):
            model.generate(args[0], pixel_values=args[1], attention_mask=args[2], latency_budget=0.6, max_new_tokens=2)


@pytest.mark.parametrize("labels,error,got", [
    (lambda ids: ids[0], ValueError, r"got \(\d+,\)"), (lambda ids: ids[..., None], ValueError, r"got \(2, \d+, 1\)"),
    (lambda ids: ids[:, 1:], ValueError, r"got \(2, \d+\)"), (lambda ids: ids.tolist(), ArgumentTypeError, "got list")])
def test_labels_not_of_the_prompts_shape_are_refused_by_name_under_a_budget(model, inputs, labels, error, got):
    """They ended in an IndexError, an AttributeError, torch.cat's error, or a size mismatch counting the latency
    token the caller never passed."""
    S = inputs["input_ids"].shape[1]
    with pytest.raises(error, match=rf"labels must be a tensor of the prompt's \[batch, tokens\] \(2, {S}\).*{got}"):
        model(**inputs, labels=labels(inputs["input_ids"]), latency_budget=0.6)


@pytest.mark.parametrize("request_", [dict(latency_budget=0.6), dict(execution_plan=ExecutionPlan.full(2, 8, 8))])
def test_a_mask_or_positions_of_the_wrong_length_are_refused_by_name(model, inputs, request_):
    """A mask one column short, with padding or without (newer transformers' generate drops a mask of ones once
    it has derived position_ids from it), and position_ids one short, are refused naming what is wrong."""
    short = inputs["attention_mask"][:, 1:].clone()
    with pytest.raises(ValueError, match=r"(attention_mask|position_ids) has shape \(2, \d+\)") as refused:
        model.generate(**dict(inputs, attention_mask=short), **request_, max_new_tokens=2)
    assert "attention_mask" in str(refused.value)
    short[1, 0] = 0
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, \d+\), expected"):
        model.generate(**dict(inputs, attention_mask=short), **request_, max_new_tokens=2)
    positions = torch.arange(inputs["input_ids"].shape[1] - 1)[None]
    with pytest.raises(ValueError, match=r"position_ids has shape \(1, \d+\), expected"):
        model(**inputs, position_ids=positions, **request_)


def test_arguments_passed_by_position_are_read_as_by_name(model, inputs):
    """Labels passed by position under a budget were not padded for the latency token (a size mismatch);
    too many arguments, or one given twice, get Python's TypeError as stock forward does."""
    names = list(inspect.signature(LlavaForConditionalGeneration.forward).parameters)[1:]  # stock's order
    names = names[:names.index("labels") + 1]
    values = inputs | {"labels": inputs["input_ids"]}
    positional = [values.get(name) for name in names]
    with torch.no_grad():
        by_name = model(**values, latency_budget=[0.6, 0.8]).loss
        assert torch.equal(model(*positional, latency_budget=[0.6, 0.8]).loss, by_name)
    with pytest.raises(TypeError, match="multiple values for argument 'input_ids'"):
        model(inputs["input_ids"], input_ids=inputs["input_ids"], latency_budget=0.6)
    slots = [p for p in list(inspect.signature(LlavaForConditionalGeneration.forward).parameters.values())[1:]
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for extra in (1, 10):  # one more than stock's forward takes, or ten
        with pytest.raises(TypeError, match="positional arguments"):
            model(*positional, *[None] * (len(slots) - len(positional) + extra), latency_budget=0.6)


def test_the_language_model_refuses_ids_and_embeddings_together_as_stock(model):
    """Called directly, the patched language model takes exactly one of input_ids and inputs_embeds, as stock's."""
    lm, stock_lm = model.model.language_model, tiny_llava(seed=2).model.language_model
    ids = torch.tensor([[5, 6, 7]])
    embeds = stock_lm.embed_tokens(ids).detach()
    for given in ({"input_ids": ids, "inputs_embeds": embeds}, {}):
        with pytest.raises(ValueError, match="exactly one of input_ids"):
            stock_lm(**given)
        with pytest.raises(ValueError, match="give exactly one of input_ids or inputs_embeds"):
            lm(**given)


def test_numpy_integers_are_integers(model, inputs):
    numpy_patched = ak.patch(tiny_llava(seed=2), "H", rank=np.int64(2), num_prefix_layers=np.int32(4))
    assert ak.plan(numpy_patched, latency_budget=0.6, **inputs) == ak.plan(model, latency_budget=0.6, **inputs)
    plan = ExecutionPlan.full(3, 8, 8)
    assert plan.rows(np.int64(1)) == plan.rows(1) and plan.rows(1).batch_size == 1


def test_patch_with_other_options_repatches(model):
    m = copy.deepcopy(model)
    ak.patch(m, "L", rank=2, num_prefix_layers=2)
    plan = ak.plan(m, latency_budget=0.5, **example_inputs(m))
    assert plan.layers[0, :2].all() and int(plan.layers[0].sum()) == 4


def test_variant_l_takes_any_rank():
    """rank sizes H's units; L schedules whole layers, so a rank that does not divide the heads is no error, and
    patching L again with another rank keeps its (trained) scheduler, as for the same units."""
    stock = tiny_llava(seed=2)
    inputs = example_inputs(stock, seed=3)
    plans = [ak.plan(ak.patch(copy.deepcopy(stock), "L", rank=rank), latency_budget=0.6, **inputs) for rank in (3, 8)]
    assert plans[0] == plans[1]
    model = ak.patch(copy.deepcopy(stock), "L", rank=3)
    with torch.no_grad():
        for p in model.model.language_model.latency_scheduler.parameters():
            p.add_(torch.randn_like(p))
    trained = ak.latency_embedding(model, 0.6)
    ak.patch(model, "L", rank=8)
    assert torch.equal(ak.latency_embedding(model, 0.6), trained)


def test_a_budget_without_the_cache_is_refused_in_generate(model, inputs):
    """Without a cache every generate step would be a new prompt with a new latency token and plan."""
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(**inputs, latency_budget=0.6, max_new_tokens=2, use_cache=False)
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(**inputs, latency_budget=0.6, generation_config=GenerationConfig(max_new_tokens=2, use_cache=False))
    unset = GenerationConfig(max_new_tokens=2, do_sample=False)  # use_cache None: generate's default, the cache
    assert unset.use_cache is None or unset.use_cache
    with torch.no_grad():
        assert model.generate(**inputs, latency_budget=0.6, generation_config=unset).shape[1] == inputs["input_ids"].shape[1] + 2


def test_a_budget_overrides_a_model_default_without_the_cache():
    """A model whose own generation config says use_cache=False (as a config saved from training does) still
    generates under a budget, with the cache, the ids it gives with the cache on; only the call can refuse it."""
    model = ak.patch(tiny_llava(), "L", rank=2)
    inputs = example_inputs(model, batch_size=2, seed=5, pad=[0, 2])
    with torch.no_grad():
        want = model.generate(**inputs, latency_budget=0.6, max_new_tokens=4, do_sample=False)
        model.generation_config.use_cache = False
        assert torch.equal(model.generate(**inputs, latency_budget=0.6, max_new_tokens=4, do_sample=False), want)
    assert model.generation_config.use_cache is False  # left as it was


def test_a_budget_overriding_the_model_default_warns_of_no_argument_beside_a_given_config():
    """The cache a budget needs is turned on in the GenerationConfig the call gives, not by a keyword beside it, of
    which transformers would warn ("Passing generation_config together with generation-related arguments") though
    the caller passed none; the given config is left as it was."""
    model = ak.patch(tiny_llava(), "L", rank=2)
    inputs = example_inputs(model, batch_size=1, seed=5)
    config = GenerationConfig(max_new_tokens=3, do_sample=False)
    given = config.to_dict()
    with torch.no_grad():
        want = model.generate(**inputs, latency_budget=0.6, generation_config=config)
    model.generation_config.use_cache = False
    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    hf_logging.warning_once.cache_clear()  # said once per process
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        with torch.no_grad():
            got = model.generate(**inputs, latency_budget=0.6, generation_config=config)
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert torch.equal(got, want)
    assert not [message for message in warned if "generation_config" in message], warned
    assert config.to_dict() == given


@pytest.mark.parametrize("option", [dict(prompt_lookup_num_tokens=3), dict(prompt_lookup_num_tokens=0),
                                    dict(assistant_early_exit=0), dict(use_mtp=True), dict(prefill_chunk_size=4)])
def test_a_budget_with_a_split_or_drafted_prefill_is_refused(model, inputs, option):
    """The latency token follows the whole prompt: assisted decoding and chunked prefill feed it otherwise.
    A draft option that is set counts, 0 included, as transformers counts it."""
    with pytest.raises(ValueError, match=f"latency_budget.*{next(iter(option))}"):
        model.generate(**{k: v[:1] for k, v in inputs.items()}, latency_budget=0.6, max_new_tokens=2, **option)


def test_draft_options_left_off_let_a_budget_generate(model, inputs):
    """use_mtp=False and unset draft options are no assisted decoding: the same ids as without them."""
    one = {k: v[:1] for k, v in inputs.items()}
    with torch.no_grad():
        plain = model.generate(**one, latency_budget=0.6, max_new_tokens=3, do_sample=False)
        off = model.generate(**one, latency_budget=0.6, max_new_tokens=3, do_sample=False, use_mtp=False,
                             prompt_lookup_num_tokens=None, assistant_early_exit=None)
    assert torch.equal(off, plain)


def test_a_call_without_the_cache_is_refused_under_a_budget_by_keyword_or_config():
    """use_cache=False given by the call, as a keyword or in a GenerationConfig passed to it, is refused under a
    budget even where the model's own default is use_cache=False too: only that default is overridden."""
    model = ak.patch(tiny_llava(), "L", rank=2)
    inputs = example_inputs(model, batch_size=1, seed=5)
    model.generation_config.use_cache = False
    with pytest.raises(ValueError, match="latency_budget needs generate's use_cache=True"):
        model.generate(**inputs, latency_budget=0.6, max_new_tokens=2, use_cache=False)
    with pytest.raises(ValueError, match="latency_budget needs generate's use_cache=True"):
        model.generate(**inputs, latency_budget=0.6, generation_config=GenerationConfig(max_new_tokens=2,
                                                                                        use_cache=False))


def test_budget_rows_are_counted_per_prompt_with_beams_however_the_prompt_is_given(model, inputs):
    """Prompts given as inputs_embeds, as generate's ``inputs`` by keyword, or positionally, are counted as input_ids
    are: one budget per prompt, before the beams."""
    embeds = prompt_embeddings(model, inputs)
    mask = inputs["attention_mask"]
    for prompt in ({"inputs_embeds": embeds}, {"inputs": inputs["input_ids"], "pixel_values": inputs["pixel_values"]}):
        with pytest.raises(ValueError, match="latency_budget has 3 values but the batch has 2 rows"):
            model.generate(**prompt, attention_mask=mask, latency_budget=[0.5, 0.6, 0.7], num_beams=2,
                           max_new_tokens=2)
    with pytest.raises(ValueError, match="latency_budget has 3 values but the batch has 2 rows"):
        model.generate(inputs["input_ids"], pixel_values=inputs["pixel_values"], attention_mask=mask,
                       latency_budget=[0.5, 0.6, 0.7], num_beams=2, max_new_tokens=2)


def test_the_models_generation_defaults_count_when_the_call_gives_a_config():
    """generate fills a given GenerationConfig's unset options from the model's own: those options are checked,
    and repeated per beam, as the model's own are without a given config (they were read from the given config
    only, so a model default of chunked prefill ran a budget to other ids)."""
    model = ak.patch(tiny_llava(), "H", rank=2)
    inputs = example_inputs(model, batch_size=1, seed=7)
    given = GenerationConfig(max_new_tokens=3, do_sample=False)
    for option, value, refusal in [("prefill_chunk_size", 8, "latency_budget does not combine with prefill_chunk_size"),
                                   ("cache_implementation", "static", "cache_implementation='static'")]:
        setattr(model.generation_config, option, value)
        with pytest.raises(ValueError, match=refusal):
            model.generate(**inputs, latency_budget=0.6, generation_config=given)
        setattr(model.generation_config, option, None)
    plan = ak.plan(model, latency_budget=0.6, **inputs)
    with torch.no_grad():
        want = model.generate(**inputs, execution_plan=plan, num_beams=2, max_new_tokens=3, do_sample=False)
        model.generation_config.num_beams = 2
        assert torch.equal(model.generate(**inputs, execution_plan=plan, generation_config=given), want)
        model.generation_config.num_beams, model.generation_config.use_cache = None, False
        assert torch.equal(model.generate(**inputs, latency_budget=0.6, generation_config=given),
                           model.generate(**inputs, latency_budget=0.6, max_new_tokens=3, do_sample=False,
                                          use_cache=True))


def test_a_guidance_scale_of_1_is_no_guidance_and_lets_a_request_generate(model, inputs, monkeypatch):
    """guidance_scale=1 runs no unconditional pass (transformers adds no guidance then): the same ids as without it;
    so does guidance_scale=None given over a model default of 2, which the call's None overrides, as in stock."""
    with torch.no_grad():
        plain = model.generate(**inputs, latency_budget=[0.6, 0.9], max_new_tokens=3, do_sample=False)
        one = model.generate(**inputs, latency_budget=[0.6, 0.9], max_new_tokens=3, do_sample=False, guidance_scale=1)
        monkeypatch.setattr(model.generation_config, "guidance_scale", 2.0)
        none = model.generate(**inputs, latency_budget=[0.6, 0.9], max_new_tokens=3, do_sample=False,
                              guidance_scale=None)
    assert torch.equal(one, plain) and torch.equal(none, plain)


@pytest.mark.parametrize("request_name", ["latency_budget", "execution_plan"])
def test_classifier_free_guidance_is_refused_with_a_request(model, inputs, request_name):
    """Guidance runs its unconditional pass as a model call of its own, outside the request: every unit on."""
    request = {"latency_budget": 0.6, "execution_plan": ExecutionPlan.full(2, 8, 8)}[request_name]
    with pytest.raises(ValueError, match=f"{request_name} does not combine with guidance_scale"):
        model.generate(**inputs, **{request_name: request}, guidance_scale=1.5, max_new_tokens=2)


@pytest.mark.parametrize("budget", [None, 0.6])
@pytest.mark.parametrize("implementation", ["static", "offloaded"])
def test_other_cache_implementations_are_refused_by_name(model, inputs, implementation, budget):
    """The model keeps its own cache; a generate that asks for another one is told so, not silently given ours."""
    with pytest.raises(ValueError, match=f"cache_implementation='{implementation}'"):
        model.generate(**inputs, latency_budget=budget, max_new_tokens=2, cache_implementation=implementation)
    config = GenerationConfig(max_new_tokens=2, cache_implementation=implementation)
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(**inputs, latency_budget=budget, generation_config=config)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, latency_budget=budget, max_new_tokens=2,
                                          cache_implementation="dynamic"),
                           model.generate(**inputs, latency_budget=budget, max_new_tokens=2))
        # a keyword overrides the config given, None included, as generate merges them: the default cache
        assert torch.equal(model.generate(**inputs, latency_budget=budget, generation_config=config,
                                          cache_implementation=None),
                           model.generate(**inputs, latency_budget=budget, max_new_tokens=2))


@pytest.mark.parametrize("budget", [None, 0.6])
def test_a_static_cache_passed_to_generate_is_refused_by_name(model, inputs, budget):
    """transformers shapes a 4-D attention mask for a StaticCache it is given: a padded batch was refused
    naming attention_mask, which the caller gave as 2-D; an unpadded one ran, the cache unused. Both are now
    refused naming the cache; a DynamicCache, which the model also leaves empty, is still taken."""
    from transformers import StaticCache

    padded = example_inputs(model, batch_size=2, seed=1, pad=[2, 0])
    # where models take `cache`, a past_key_values=None beside it is ignored, as transformers' deprecate_kwarg does
    beside = [{}, {"past_key_values": None}] if CACHE_KWARG == "cache" else [{}]
    for given, extra in itertools.product((padded, inputs), beside):
        static = StaticCache(config=model.config.text_config, max_cache_len=64)
        with pytest.raises(ValueError, match=f"^{CACHE_KWARG}: .* takes no StaticCache"):
            model.generate(**given, latency_budget=budget, max_new_tokens=2, **{CACHE_KWARG: static}, **extra)
    with torch.no_grad():
        dynamic = DynamicCache(config=model.config.text_config)
        assert torch.equal(model.generate(**padded, latency_budget=budget, max_new_tokens=2, do_sample=False,
                                          **{CACHE_KWARG: dynamic}),
                           model.generate(**padded, latency_budget=budget, max_new_tokens=2, do_sample=False))


def test_attention_weights_are_refused(model, inputs):
    with pytest.raises(ValueError, match="output_attentions"):
        model(**inputs, output_attentions=True)


def test_attention_weights_asked_for_in_the_config_are_refused():
    """output_attentions set in the text config (eager attention: transformers refuses it beside SDPA), where stock
    returns attention weights: refused as in the call (the patched model returned none)."""
    stock = tiny_llava(seed=3, num_layers=2)
    stock.set_attn_implementation("eager")
    stock.config.text_config.output_attentions = True
    inputs = example_inputs(stock, seed=4)
    with torch.no_grad():
        assert len(stock(**inputs).attentions) == 2
        model = ak.patch(stock, "H", rank=2)
        with pytest.raises(ValueError, match="output_attentions"):
            model(**inputs)


def test_unreadable_scheduler_files_are_refused_by_name(tmp_path):
    """A missing, unreadable or mismatched file, or no path at all, is refused naming the argument; a
    patched model that is re-patched with such a file stays as it was."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors" * 4)
    good = tmp_path / "good.safetensors"
    ak.save_scheduler(ak.patch(tiny_llava(), "L"), good)
    with safe_open(str(good), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    files = []
    for name, changed in [("short", tensors | {"head.weight": tensors["head.weight"][:-1]}),
                          ("missing", {k: v for k, v in tensors.items() if k != "head.bias"}),
                          ("extra", tensors | {"extra": torch.zeros(1)})]:
        save_file(changed, str(tmp_path / name), metadata=metadata)
        files.append(tmp_path / name)
    model = ak.patch(tiny_llava(), "L")
    scheduler = model.model.language_model.latency_scheduler
    for path in [tmp_path / "missing.safetensors", junk, 123] + files:
        with pytest.raises(ValueError, match="scheduler"):
            ak.patch(model, "L", scheduler=path)
        assert model.model.language_model.latency_scheduler is scheduler
    with pytest.raises(ArgumentTypeError, match="path must be a file path"):
        ak.save_scheduler(model, 123)
    for path in (tmp_path, tmp_path / "no such folder" / "s.safetensors"):
        with pytest.raises(ValueError, match=r"path=.* cannot be written"):
            ak.save_scheduler(model, path)
    plain = tmp_path / "plain.safetensors"  # the right tensors without save_scheduler's setting
    save_file(tensors, str(plain))
    foreign = tmp_path / "foreign.safetensors"  # with metadata of its own, as safetensors' and transformers' savers
    save_file(tensors, str(foreign), metadata={"format": "pt"})
    for path in (plain, foreign):
        with pytest.raises(ValueError, match=r"scheduler=.* holds none of the setting save_scheduler writes"):
            ak.patch(model, "L", scheduler=path)
        assert model.model.language_model.latency_scheduler is scheduler


def test_scheduler_files_with_values_not_finite_in_the_models_dtype_are_refused(tmp_path):
    """A NaN, or a value too large for the model's float16, would make every plan's logits NaN: refused
    naming the file and the tensor; the same large value loads into a float32 model."""
    good = tmp_path / "good.safetensors"
    ak.save_scheduler(ak.patch(tiny_llava(), "L"), good)
    with safe_open(str(good), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for value, dtype in [(torch.nan, torch.float32), (1e5, torch.float16)]:
        path = tmp_path / f"{value}.safetensors"
        bias = tensors["head.bias"].clone()
        bias[1] = value
        save_file(tensors | {"head.bias": bias}, str(path), metadata=metadata)
        model = ak.patch(tiny_llava().to(dtype), "L")
        with pytest.raises(ValueError, match=rf"^scheduler=.*{path.name} holds values that are not finite in "
                                             rf"{dtype} .*: head.bias$"):
            ak.patch(model, "L", scheduler=path)
    ak.patch(tiny_llava(), "L", scheduler=path)  # 1e5 is finite in float32


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_scheduler_files_with_tensors_that_are_not_floating_point_are_refused(tmp_path, dtype):
    """Integer or bool weights (no save_scheduler writes them) were cast to the model's dtype and loaded: refused
    naming the file and the tensor, the model's scheduler left as it was."""
    good = tmp_path / "good.safetensors"
    ak.save_scheduler(ak.patch(tiny_llava(), "L"), good)
    with safe_open(str(good), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    path = tmp_path / "integers.safetensors"
    save_file(tensors | {"head.bias": torch.ones_like(tensors["head.bias"], dtype=dtype)}, str(path), metadata=metadata)
    model = ak.patch(tiny_llava(seed=3), "L")
    before = {k: v.clone() for k, v in model.model.language_model.latency_scheduler.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^scheduler=.*{path.name} holds tensors that are not floating point: "
                                         rf"head.bias \({dtype}\)$"):
        ak.patch(model, "L", scheduler=path)
    after = model.model.language_model.latency_scheduler.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_cache_left_empty_by_an_earlier_call_is_refused_when_continued(model, inputs):
    """Stock fills a cache it is given; a patched model returns its own AdaptiveCache instead. Continuing from
    the given one (still empty) would run the new tokens as a new prompt, so it is refused by name."""
    with torch.no_grad():
        given = DynamicCache(config=model.config.text_config)
        ids = model.generate(**inputs, max_new_tokens=2, do_sample=False, **{CACHE_KWARG: given})
        with pytest.raises(ValueError, match=f"^{CACHE_KWARG}: this cache was given to an earlier call"):
            model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, **{CACHE_KWARG: given})
        given = DynamicCache(config=model.config.text_config)
        model(**inputs, latency_budget=0.6, **{CACHE_KWARG: given})
        with pytest.raises(ValueError, match=f"^{CACHE_KWARG}: this cache was given to an earlier call"):
            model(input_ids=ids[:, -1:], **{CACHE_KWARG: given})


def test_a_call_refused_for_its_arguments_leaves_the_given_cache_free(model, inputs):
    """A cache is taken by a call only once its request's arguments passed their checks: after a refused budget or
    plan, the same (still empty) cache serves the corrected call, as stock's does, which then returns its own."""
    with torch.no_grad():
        given = DynamicCache(config=model.config.text_config)
        for bad in ({"latency_budget": 1.5}, {"execution_plan": ExecutionPlan.full(3, 8, 8)}):
            with pytest.raises(ValueError, match=next(iter(bad))):
                model(**inputs, **bad, **{CACHE_KWARG: given})
        out = model(**inputs, latency_budget=0.6, **{CACHE_KWARG: given})
        assert torch.equal(out.logits, model(**inputs, latency_budget=0.6).logits)
        with pytest.raises(ValueError, match=f"^{CACHE_KWARG}: this cache was given to an earlier call"):
            model(input_ids=inputs["input_ids"][:, -1:], **{CACHE_KWARG: given})


def test_a_call_that_fails_mid_prefill_leaves_the_given_cache_free():
    """A given cache was marked taken before the layers ran, so a prefill failing in them (out of memory, an
    interrupt) left the caller's still-empty cache refused as given to an earlier call that returned its own, which
    none did. It is marked once a call returns its own."""
    model = ak.patch(tiny_llava(seed=28), "H", rank=2)
    inputs = example_inputs(model, batch_size=1, seed=29)
    settings = model.model.language_model._ak_settings
    working = settings.backend

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory (planted)")

    given = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        settings.backend = dataclasses.replace(working, attention=out_of_memory)
        with pytest.raises(RuntimeError, match="planted"):
            model(**inputs, latency_budget=0.6, **{CACHE_KWARG: given})
        settings.backend = working
        out = model(**inputs, latency_budget=0.6, **{CACHE_KWARG: given})
        assert torch.equal(out.logits, model(**inputs, latency_budget=0.6).logits)
        with pytest.raises(ValueError, match=f"^{CACHE_KWARG}: this cache was given to an earlier call"):
            model(input_ids=inputs["input_ids"][:, -1:], **{CACHE_KWARG: given})


@pytest.mark.parametrize("request_", [{}, {"latency_budget": 0.6}, {"execution_plan": ExecutionPlan.full(2, 8, 8)}],
                         ids=["none", "budget", "plan"])
def test_a_filled_cache_the_model_did_not_return_is_refused(model, inputs, request_):
    """A cache stock filled holds keys and values of every layer and head: the patched model would run the new
    tokens as a new prompt beside them, so it is refused by name, whatever the request."""
    stock = tiny_llava(seed=2)
    with torch.no_grad():
        for filled in (cache_of(stock(**inputs, use_cache=True)),
                       cache_of(stock.model.language_model(input_ids=inputs["input_ids"][:, :1], use_cache=True))):
            assert isinstance(filled, DynamicCache) and filled.get_seq_length() > 0
            with pytest.raises(ValueError, match=f"^{CACHE_KWARG}: a patched model continues only the AdaptiveCache "
                                                 "it returned, got a filled DynamicCache"):
                model(input_ids=torch.full((2, 1), 5), **{CACHE_KWARG: filled}, **request_)


def test_continuing_a_cache_with_another_row_count_is_refused(model, inputs):
    """A 2-row request continued with 1 or 3 rows (by hand, or by generate with beams) failed deep inside."""
    with torch.no_grad():
        cache = cache_of(model(**inputs, latency_budget=0.6, use_cache=True))
        for rows in (1, 3):
            refused = (rf"input_ids \(or inputs_embeds\) has {rows} rows, but the cache it continues "
                       rf"\({CACHE_KWARG}\) holds 2")
            with pytest.raises(ValueError, match=refused):
                model(input_ids=torch.full((rows, 1), 5), **{CACHE_KWARG: copy.deepcopy(cache)})
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        refused = rf"input_ids \(or inputs_embeds\) has 6 rows, but the cache it continues \({CACHE_KWARG}\) holds 2"
        with pytest.raises(ValueError, match=refused):
            model.generate(input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences), num_beams=3,
                           max_new_tokens=2, **{CACHE_KWARG: out.past_key_values})


def test_continuing_a_cache_under_another_plan_or_budget_is_refused(model, inputs):
    """A cache keeps the plan its prefill made: another plan or other budgets given when continuing it were
    silently run under the cache's. Equal ones (other objects) or none continue it, and alike."""
    run = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True)

    def go_on(first, **request):
        ids = first.sequences
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **run, **request,
                              **{CACHE_KWARG: copy.deepcopy(first.past_key_values)}).sequences

    with torch.no_grad():
        by_budget = model.generate(**inputs, latency_budget=[0.6, 0.8], **run)
        plan = by_budget.past_key_values.plan
        same = ExecutionPlan(plan.layers.clone(), plan.heads.clone(), plan.groups.clone())
        other = ExecutionPlan(plan.layers.clone(), plan.heads.clone(), plan.groups.clone())
        other.heads[1, -1, 0] = ~other.heads[1, -1, 0]
        other.layers[1, -1] = True
        by_plan = model.generate(**inputs, execution_plan=same, **run)
        for first, request in ((by_budget, dict(latency_budget=[0.6, 0.8])),
                               (by_budget, dict(latency_budget=torch.tensor([0.6, 0.8]))),
                               (by_budget, dict(execution_plan=same)), (by_plan, dict(execution_plan=same))):
            assert torch.equal(go_on(first, **request), go_on(first)), request
        for first, request, made in ((by_budget, dict(latency_budget=0.6), r"latency_budget \[0.6, 0.8\]"),
                                     (by_budget, dict(execution_plan=other), "another plan"),
                                     (by_plan, dict(execution_plan=other), "another plan"),
                                     (by_plan, dict(latency_budget=0.6), "no latency_budget")):
            name = next(iter(request))
            refused = rf"{name}: the cache this call continues \({CACHE_KWARG}\) was filled under {made}"
            with pytest.raises(ValueError, match=refused):
                go_on(first, **request)
        with ak.graph_safe(), pytest.raises(ValueError, match=r"execution_plan has layers \(3, "):  # masks unread
            three_rows = ExecutionPlan.full(3, plan.num_layers, plan.num_heads)
            model(input_ids=by_plan.sequences[:, -1:], execution_plan=three_rows,
                  **{CACHE_KWARG: copy.deepcopy(by_plan.past_key_values)})


@pytest.mark.parametrize("sizes", [dict(num_layers=6), dict(num_layers=5, num_heads=4, num_kv_heads=2, hidden_size=32,
                                                              intermediate_size=90)], ids=["fewer layers", "narrower"])
def test_continuing_a_cache_that_a_decoder_of_another_shape_filled_is_refused(sizes):
    """One model continuing another's cache: with fewer layers in either, the layers the cache lacked were silently
    not run; with other widths it failed in a reshape. Refused naming the cache and both shapes, either way round."""
    model = ak.patch(tiny_llava(seed=9), "H", rank=2)
    other = ak.patch(tiny_llava(seed=10, **sizes), "H", rank=2)
    for filler, continuer in ((other, model), (model, other)):
        inputs = example_inputs(filler, batch_size=1, seed=11)
        with torch.no_grad():
            cache = cache_of(filler(**inputs, latency_budget=0.6))
        shapes = [text_model_shape(m) for m in (filler, continuer)]
        refused = (rf"^\w+: the cache this call continues was filled by a decoder of another shape "
                   rf"\({re.escape(str(shapes[0]))}\) than this model's \({re.escape(str(shapes[1]))}\)")
        with torch.no_grad(), pytest.raises(ValueError, match=refused):
            continuer(input_ids=torch.full((1, 1), 5), attention_mask=torch.ones(1, cache.length + 1, dtype=torch.long),
                      **{CACHE_KWARG: cache})


def test_patching_a_model_that_shares_an_already_patched_language_model_is_refused_before_anything_changed():
    """A second LLaVA model given a patched model's language model: patching it failed in its class swap after
    setting its own settings and scheduler on the shared language model, so the first model ran other plans."""
    first = ak.patch(tiny_llava(seed=5), "H", rank=2, num_prefix_layers=4)
    inputs = example_inputs(first, batch_size=1, seed=6)
    with torch.no_grad():
        before = first(**inputs, latency_budget=0.6)
    second = tiny_llava(seed=5)
    second.model.language_model = first.model.language_model
    with pytest.raises(ValueError, match=re.escape("model.model.language_model is patched already, as part of another "
                                                   "model that shares it; unpatch that model first")):
        ak.patch(second, "L", num_prefix_layers=2)
    assert type(second) is LlavaForConditionalGeneration
    with torch.no_grad():
        after = first(**inputs, latency_budget=0.6)
    assert cache_of(after).plan == cache_of(before).plan
    assert torch.equal(after.logits, before.logits)


def test_a_patched_model_whose_language_model_was_replaced_by_a_stock_one_refuses_requests_until_patched(tmp_path):
    """A stock language model set in place of the patched one ran every unit whatever the budget, ak.plan returned
    None, and generate and unpatch failed on a missing attribute. Requests are refused by name; patching again
    patches it, and unpatch gives stock."""
    stock = tiny_llava(seed=7)
    inputs = example_inputs(stock, batch_size=1, seed=8)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    replaced = re.escape("model.model.language_model was replaced by an unpatched one after patch; call "
                         "adaptive_kernels.patch(model) again")
    model.model.language_model = copy.deepcopy(stock.model.language_model)
    for call in (lambda: model(**inputs, latency_budget=0.6), lambda: model(**inputs),
                 lambda: model.generate(**inputs, latency_budget=0.6, max_new_tokens=2),
                 lambda: ak.plan(model, 0.6, **inputs), lambda: ak.save_scheduler(model, tmp_path / "s.safetensors"),
                 lambda: model.save_pretrained(tmp_path / "ckpt")):
        with torch.no_grad(), pytest.raises(ValueError, match=replaced):
            call()
    assert not any(tmp_path.iterdir())  # refused before writing
    ak.patch(model, "H", rank=2)
    with torch.no_grad():
        want = ak.patch(copy.deepcopy(stock), "H", rank=2)(**inputs, latency_budget=0.6).logits
        assert torch.equal(model(**inputs, latency_budget=0.6).logits, want)
    model.model.language_model = copy.deepcopy(stock.model.language_model)
    ak.unpatch(model)
    assert type(model) is LlavaForConditionalGeneration
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock(**inputs).logits)


@pytest.mark.parametrize("budget", [None, 0.6])
def test_an_empty_prompt_is_refused(model, budget):
    with pytest.raises(ValueError, match=r"input_ids \(or inputs_embeds\): a prompt needs at least one token"):
        model(input_ids=torch.zeros(1, 0, dtype=torch.long), latency_budget=budget)


@pytest.mark.parametrize("dropped", ["variant", "num_layers", "num_prefix_layers", "num_heads", "hidden_size", "rank"])
def test_a_scheduler_file_missing_part_of_its_setting_is_refused(tmp_path, dropped):
    """A file whose metadata lacks one key of the setting save_scheduler writes cannot show it fits this unit
    space: refused naming the key, the model keeping its scheduler. Rank and prefix change no tensor shape, so
    without the check an H file of rank 2 without its rank loads into a rank-4 model and plans silently wrong."""
    saved = tmp_path / "h2.safetensors"
    ak.save_scheduler(ak.patch(tiny_llava(), "H", rank=2), saved)
    with safe_open(str(saved), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    partial = tmp_path / f"without-{dropped}.safetensors"
    save_file(tensors, str(partial), metadata={k: v for k, v in metadata.items() if k != dropped})
    for rank in ([2, 4] if dropped == "rank" else [2]):  # the file's own setting, then (rank) another rank
        model = ak.patch(tiny_llava(), "H", rank=rank)
        scheduler = model.model.language_model.latency_scheduler
        missing = rf"^scheduler=.* was saved for another setting \({dropped}: missing from the file, model "
        with pytest.raises(ValueError, match=missing):
            ak.patch(model, "H", rank=rank, scheduler=partial)
        assert model.model.language_model.latency_scheduler is scheduler


@pytest.mark.parametrize("prefix", [0, 1, 7])
def test_num_prefix_layers_takes_every_value_from_0_to_layers_minus_1(prefix):
    """README: num_prefix_layers is 0 to layers - 1 (at least one layer left to schedule). Each such prefix is
    accepted, its layers always run, and every row's plan holds floor(T*b) units when that is at least the
    prefix's P (else the prefix only): with 0, every layer is scheduled, even at the smallest budget."""
    stock = tiny_llava(seed=2)
    inputs = example_inputs(stock, batch_size=2, seed=7)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, num_prefix_layers=prefix)
    T, P = 8 * 4, prefix * 4  # rank-2 units: 4 per layer of 8 heads
    budgets = [0.05, 0.55]
    plan = ak.plan(model, latency_budget=budgets, **inputs)
    assert plan.layers[:, :prefix].all() and plan.heads[:, :prefix].all() and plan.groups[:, :prefix].all()
    for row, b in enumerate(budgets):
        units = max(int(T * b), P)
        assert int(plan.heads[row].sum()) == int(plan.groups[row].sum()) == 2 * units, (prefix, b)


@pytest.mark.parametrize("num_layers", [1, 3, 5])
def test_the_default_prefix_is_half_the_layers_rounded_down(num_layers):
    """num_prefix_layers=None is floor(L / 2), which leaves a layer to schedule for every L (one layer: no
    prefix). At the smallest budget an L plan runs the prefix only, its first L // 2 layers in every row; at
    any budget the plans equal those of num_prefix_layers=L // 2 given by hand."""
    stock = tiny_llava(seed=2, num_layers=num_layers)
    inputs = example_inputs(stock, batch_size=2, seed=num_layers)
    P = num_layers // 2
    default = ak.patch(copy.deepcopy(stock), "L")
    prefix_only = [[True] * P + [False] * (num_layers - P)] * 2
    assert ak.plan(default, latency_budget=0.01, **inputs).layers.tolist() == prefix_only
    given = ak.patch(copy.deepcopy(stock), "L", num_prefix_layers=P)
    budgets = [0.01, 0.99]
    assert ak.plan(default, latency_budget=budgets, **inputs) == ak.plan(given, latency_budget=budgets, **inputs)


@pytest.mark.parametrize("name", ["labels", "position_ids"])
def test_labels_and_position_ids_off_the_model_device_are_refused_by_name(name):
    """DESIGN invariant 5 (tensors on the wrong device named): labels and position_ids on another device (the meta
    device stands for one) are refused naming them, in forward with or without a budget, as the other inputs are."""
    model = ak.patch(tiny_llava(seed=50), "H", rank=2)
    inputs = example_inputs(model, batch_size=2, seed=51)
    values = {"labels": inputs["input_ids"], "position_ids": torch.arange(inputs["input_ids"].shape[1])[None]}
    moved = inputs | {name: values[name].to("meta")}
    for request in ({}, {"latency_budget": 0.6}):
        with torch.no_grad(), pytest.raises(ValueError, match=f"{name} is on meta, but the model is on cpu"):
            model(**moved, **request)


def test_a_device_budget_within_graph_safe_is_refused_as_a_read_back():
    """Within graph_safe() nothing may be read back to the host: a latency_budget tensor off the CPU (the meta
    device stands for a GPU) is refused naming latency_budget and saying why, as host_budgets' docstring has it."""
    model = ak.patch(tiny_llava(seed=60), "H", rank=2)
    inputs = example_inputs(model, batch_size=2, seed=61)
    read_back = "latency_budget: a tensor on meta is read back"
    with torch.no_grad(), ak.graph_safe(), pytest.raises(ValueError, match=read_back):
        model(**inputs, latency_budget=torch.tensor([0.5, 0.6], device="meta"))


def test_an_unsupported_language_model_is_named_in_the_refusal():
    """The refusal of a LLaVA whose language model is no Llama names that language model's type (mistral), not the
    LLaVA wrapper's."""
    config = tiny_llava_config()
    mistral = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=512)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=config.vision_config, text_config=mistral,
                                                      image_token_id=511))
    with pytest.raises(ArgumentTypeError, match=r"one of \['llama'\]; got 'mistral'"):
        ak.patch(model)


def test_a_cache_filled_by_a_decoder_of_other_widths_but_as_many_layers_is_refused():
    """A cache continues only the decoder that filled it: one of the same layers and heads but another MLP width
    (its index lists count other neurons) is refused naming both shapes, either way round."""
    model = ak.patch(tiny_llava(seed=62), "H", rank=2)
    other = ak.patch(tiny_llava(seed=63, intermediate_size=90), "H", rank=2)
    for filler, continuer in ((other, model), (model, other)):
        inputs = example_inputs(filler, batch_size=1, seed=64)
        with torch.no_grad():
            cache = cache_of(filler(**inputs, latency_budget=0.6))
        with torch.no_grad(), pytest.raises(ValueError,
                                            match="filled by a decoder of another shape .*intermediate_size=172"):
            continuer(input_ids=torch.full((1, 1), 5), attention_mask=torch.ones(1, cache.length + 1, dtype=torch.long),
                      **{CACHE_KWARG: cache})


def test_labels_of_another_shape_than_prompt_embeddings_are_refused_by_name_under_a_budget():
    """A prompt given as inputs_embeds is counted as input_ids are: labels one token short of it under a budget
    are refused naming labels and the prompt's [batch, tokens], not left to fail in the loss."""
    model = ak.patch(tiny_llava(seed=65), "H", rank=2)
    ids = example_inputs(model, batch_size=2, seed=66)["input_ids"]
    embeds = model.model.language_model.embed_tokens(ids).detach()
    with torch.no_grad(), pytest.raises(ValueError, match=rf"labels must be a tensor of the prompt's \[batch, tokens\] "
                                                          rf"\(2, {ids.shape[1]}\).*got \(2, {ids.shape[1] - 1}\)"):
        model(inputs_embeds=embeds, labels=ids[:, 1:], latency_budget=0.6)


@pytest.mark.parametrize("copies", [dict(num_return_sequences=2, do_sample=True), dict(num_beams=2)])
def test_a_plan_of_the_wrong_row_count_is_refused_in_prompts_with_copies(copies):
    """With beams or returned sequences, a plan's rows are counted per prompt, before generate repeats them: a plan
    of 3 rows for 2 prompts is refused naming the 2 rows the prompts need, not the repeated counts."""
    model = ak.patch(tiny_llava(seed=67), "H", rank=2)
    inputs = example_inputs(model, batch_size=2, seed=68)
    refused = r"execution_plan has layers \(3, 8\).*\(batch, layers\) = \(2, 8\)"
    with torch.no_grad(), pytest.raises(ValueError, match=refused):
        model.generate(**inputs, execution_plan=ExecutionPlan.full(3, 8, 8), max_new_tokens=2, **copies)

