"""A patched tiny LLaVA against stock transformers: masked computation and weights sliced to the plan."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import pickle
import re
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaForConditionalGeneration, LogitsProcessor, LogitsProcessorList

import adaptive_kernels as ak
from adaptive_kernels import ExecutionPlan
from adaptive_kernels.plan import Schedule
from adaptive_kernels.cache import CAPACITY_STEP, AdaptiveCache
from adaptive_kernels.models import text_model_shape
from adaptive_kernels.tiny import example_inputs, tiny_llava, tiny_llava_config
from adaptive_kernels.models.llama import decoder_shape, stacked_qkv
from adaptive_kernels.models import llava as llava_module
from adaptive_kernels.models.llava import SCHEDULER_FILE, prompt_embeddings
from adaptive_kernels.sliced import masked_stock, sliced_stock
from oracles import (CACHE_KWARG, WeightCopies, cache_of, cpu_decode_graphs, fed_latency_token, prompt_labels,
                     replaying_decode_steps, stock_decode_logits, stock_of_shape)

L, H, KV = 8, 8, 4
TOL = dict(rtol=1e-5, atol=2e-6)  # float32: sums in another order than stock's differ by about 1e-7


@pytest.fixture(scope="module")
def stock():
    return tiny_llava(seed=1)


def patched(stock, variant="L", **kw):
    return ak.patch(copy.deepcopy(stock), variant, rank=kw.pop("rank", 2), **kw)


def decoder_with(num_layers: int):
    """The tiny model's DecoderShape with ``num_layers`` layers, for caches made by hand."""
    return decoder_shape(tiny_llava_config(num_layers=num_layers).text_config)


def random_plan(batch: int, seed: int) -> ExecutionPlan:
    """Random masks, with one layer of no heads, one of no groups and one executed with nothing on."""
    g = torch.Generator().manual_seed(seed)
    layers = torch.rand(batch, L, generator=g) < 0.75
    layers[:, 1:4] = True
    heads = (torch.rand(batch, L, H, generator=g) < 0.5) & layers[..., None]
    groups = (torch.rand(batch, L, H, generator=g) < 0.5) & layers[..., None]
    heads[:, 1], groups[:, 2] = False, False
    heads[:, 3], groups[:, 3] = False, False
    return ExecutionPlan(layers, heads, groups)


def row_inputs(inputs: dict, row: int) -> dict:
    return {k: v[row:row + 1] for k, v in inputs.items()}


def greedy(model, inputs, n=5, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)


def test_forced_plan_matches_masked_and_sliced_stock(stock):
    inputs = example_inputs(stock, batch_size=3, seed=11, pad=[0, 3, 0])
    plan = random_plan(3, seed=5)
    model = patched(stock, "H")
    with torch.no_grad():
        ours = model(**inputs, execution_plan=plan).logits
        masked = masked_stock(stock, plan)(**inputs).logits
    torch.testing.assert_close(ours, masked, **TOL)
    tokens = greedy(model, inputs, execution_plan=plan)
    for row in range(3):
        oracle = sliced_stock(stock, plan, row)
        with torch.no_grad():
            torch.testing.assert_close(ours[row:row + 1], oracle(**row_inputs(inputs, row)).logits, **TOL)
        assert torch.equal(tokens[row:row + 1], greedy(oracle, row_inputs(inputs, row)))


def test_norms_swapped_for_other_modules_run_as_those_modules(stock):
    """A decoder whose RMSNorms were swapped for other modules (as kernel libraries swap in their own; torch's
    RMSNorm here, with other weights and eps): the patched model calls them, in prefill and decode, as the masked
    computation of the model with the same swap does."""
    swapped = copy.deepcopy(stock)
    lm = swapped.model.language_model
    g = torch.Generator().manual_seed(17)

    def other_norm():
        norm = torch.nn.RMSNorm(lm.config.hidden_size, eps=1e-2)
        norm.weight.data.copy_(1 + torch.randn(lm.config.hidden_size, generator=g))
        return norm

    for layer in lm.layers:
        layer.input_layernorm, layer.post_attention_layernorm = other_norm(), other_norm()
    lm.norm = other_norm()
    inputs = example_inputs(stock, batch_size=2, seed=19, pad=[0, 2])
    plan = random_plan(2, seed=23)
    model = patched(swapped, "H")
    run = dict(n=3, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ours, masked = model(**inputs, execution_plan=plan).logits, masked_stock(swapped, plan)(**inputs).logits
    torch.testing.assert_close(ours, masked, **TOL)
    ours, masked = greedy(model, inputs, execution_plan=plan, **run), greedy(masked_stock(swapped, plan), inputs, **run)
    assert torch.equal(ours.sequences, masked.sequences)
    for got, want in zip(ours.logits, masked.logits, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_first_executed_layer_without_heads_decodes_as_masked_and_sliced_stock(stock):
    """Rows whose first executed layer runs no head, one of them left padded: decode gives the masked
    computation, and the sliced stock oracle agrees (stock caches read their length from that layer)."""
    inputs = example_inputs(stock, batch_size=2, seed=43, pad=[3, 0])
    plan = random_plan(2, seed=47)
    plan.layers[:, 0] = plan.heads[:, 0] = plan.groups[:, 0] = False
    plan.layers[:, 1], plan.heads[:, 1], plan.groups[:, 1] = True, False, torch.arange(H) % 2 == 0
    model = patched(stock, "H")
    run = dict(n=4, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    ours = greedy(model, inputs, execution_plan=plan, **run)
    references = [greedy(masked_stock(stock, plan), inputs, **run)]
    references += [greedy(sliced_stock(stock, plan, row), row_inputs(inputs, row), **run) for row in range(2)]
    rows = [slice(0, 2), slice(0, 1), slice(1, 2)]
    for want, row in zip(references, rows):
        assert torch.equal(ours.sequences[row], want.sequences)
        for got, theirs in zip(ours.logits, want.logits, strict=True):
            torch.testing.assert_close(got[row], theirs, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_full_plan_gives_stock_result(stock, dtype):
    """Bit for bit at the prompt's positions (the torch backend attends with SDPA, as stock does); the
    same ids from generate (padded decode steps agree to rounding: see the test below)."""
    stock = copy.deepcopy(stock).to(dtype)
    inputs = example_inputs(stock, batch_size=2, seed=3, pad=[2, 0])
    model = patched(stock, "H")
    full = ExecutionPlan.full(2, L, H)
    real = inputs["attention_mask"].bool()  # the left padding's logits are nobody's
    with torch.no_grad():
        want = stock(**inputs).logits[real]
        assert torch.equal(model(**inputs, execution_plan=full).logits[real], want)
        assert torch.equal(model(**inputs).logits[real], want)
    assert torch.equal(greedy(model, inputs, execution_plan=full), greedy(stock, inputs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_narrower_inputs_embeds_give_stock_result_on_the_torch_backend(stock, dtype):
    """Half-precision inputs_embeds into the float32 model: the torch backend keeps them as given, as stock does
    (promoting where they meet the weights), so the logits are stock's bit for bit; the kernel backends cast them
    to the weights' dtype first (test_backends). Under a budget the latency token joins the prompt in its dtype:
    the masked stock model fed both in that dtype."""
    embeds = stock.model.language_model.embed_tokens(example_inputs(stock, batch_size=2, seed=9)["input_ids"])
    embeds = embeds.detach().to(dtype)
    model = patched(stock, "H", backend="torch")
    budget = 0.6
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=embeds).logits, stock(inputs_embeds=embeds).logits)
        plan = ak.plan(model, latency_budget=budget, inputs_embeds=embeds)
        token = ak.latency_embedding(model, budget).to(dtype).expand(2, 1, -1)
        want = masked_stock(stock, plan)(inputs_embeds=torch.cat([embeds, token], 1)).logits
        torch.testing.assert_close(model(inputs_embeds=embeds, latency_budget=budget).logits, want, **TOL)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_full_plan_gives_stock_result_under_autocast_on_the_torch_backend(stock, mode):
    """torch.autocast (bfloat16 on the CPU) over the float32 model, as mixed-precision training runs it: the
    residual stream stays float32 and the updates come out in bfloat16; the torch backend follows autocast as
    stock does, so the logits and the loss are stock's bit for bit."""
    inputs = example_inputs(stock, batch_size=2, seed=4, pad=[0, 3])
    labels = prompt_labels(inputs)
    model, reference = patched(stock, "H", backend="torch"), copy.deepcopy(stock)
    getattr(model, mode)(), getattr(reference, mode)()
    real = inputs["attention_mask"].bool()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(**inputs, labels=labels)
        got = model(**inputs, labels=labels, execution_plan=ExecutionPlan.full(2, L, H))
    assert torch.equal(got.logits[real], want.logits[real])
    assert torch.equal(got.loss, want.loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_full_plan_decodes_as_stock_bit_for_bit_on_the_torch_backend(stock, dtype):
    """Unpadded prompts: every decode step's logits equal stock's bit for bit (the torch backend's steps attend
    over the filled positions, as stock's do; with padding, transformers 5.2x's SDPA lays a single query's
    heads out otherwise, and fp32 agrees to rounding)."""
    stock = copy.deepcopy(stock).to(dtype)
    inputs = example_inputs(stock, batch_size=2, seed=5)
    run = dict(n=5, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    ours = greedy(patched(stock, "H", backend="torch"), inputs, execution_plan=ExecutionPlan.full(2, L, H), **run)
    want = greedy(stock, inputs, **run)
    assert torch.equal(ours.sequences, want.sequences)
    for got, theirs in zip(ours.logits, want.logits, strict=True):
        assert torch.equal(got, theirs)


def test_full_plan_gives_stock_result_with_narrow_key_and_value_projections():
    """k and v 8 wide (one key/value head of 8): one product over q, k and v stacked differed from stock's three
    products in the last bits (fp32 on the CPU); the torch backend projects them apart, as stock does."""
    stock = tiny_llava(seed=5, num_layers=4, num_heads=6, num_kv_heads=1, hidden_size=48)
    inputs = example_inputs(stock, batch_size=2, seed=6, pad=[0, 3])
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        assert torch.equal(patched(stock, "H")(**inputs).logits[real], stock(**inputs).logits[real])


def test_the_patched_attention_ignores_the_configs_attention_implementation(stock):
    """A stock decoder set to eager attention is matched to rounding; the patched one attends as under SDPA."""
    eager = copy.deepcopy(stock)
    eager.model.language_model.set_attn_implementation("eager")
    inputs = example_inputs(stock, batch_size=2, seed=4, pad=[0, 3])
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        got = patched(eager, "H")(**inputs).logits[real]
        torch.testing.assert_close(got, eager(**inputs).logits[real], **TOL)
        assert torch.equal(got, stock(**inputs).logits[real])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_a_budget_runs_in_the_models_dtype(stock, dtype):
    """The scheduler is patched in the model's dtype: a budget on a float16, bfloat16 or float64 model plans and
    runs in that dtype, as the masked computation of its plan fed the prompt and the latency token (float64 to its
    own rounding: no sum is made in float32)."""
    stock = copy.deepcopy(stock).to(dtype)
    inputs = example_inputs(stock, batch_size=2, seed=57, pad=[0, 2])
    budgets = [0.6, 0.85]
    model = patched(stock, "H")
    plan = ak.plan(model, latency_budget=budgets, **inputs)
    with torch.no_grad():
        ours = model(**inputs, latency_budget=budgets).logits
        embeds, mask = fed_latency_token(model, stock, inputs, budgets)
        masked = masked_stock(stock, plan)(inputs_embeds=embeds, attention_mask=mask).logits
    assert ours.dtype == dtype and embeds.dtype == dtype
    tolerance = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}[dtype]  # 6, 5 times the half errors
    torch.testing.assert_close(ours[mask.bool()].float(), masked[mask.bool()].float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sliced_stock_runs_in_the_models_half_precision(stock, dtype):
    """The sweep's "ideal" (sliced_stock of the model it times, bfloat16 on a GPU) in half precision: the cut model
    keeps the model's dtype and only the executed layers, and each row gives the patched model's logits under the
    plan (layers with no head, no neuron, nothing on; kept key/value groups with query heads off) to rounding."""
    stock = copy.deepcopy(stock).to(dtype)
    inputs = example_inputs(stock, batch_size=2, seed=63)
    plan = random_plan(2, seed=65)
    tolerance = {torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    with torch.no_grad():
        ours = patched(stock, "H")(**inputs, execution_plan=plan).logits
        for row in range(2):
            oracle = sliced_stock(stock, plan, row)
            assert {p.dtype for p in oracle.parameters()} == {dtype}
            kept = int(plan.layers[row].sum())
            assert len(oracle.model.language_model.layers) == oracle.config.text_config.num_hidden_layers == kept
            want = oracle(**row_inputs(inputs, row)).logits
            assert want.dtype == dtype
            torch.testing.assert_close(ours[row:row + 1].float(), want.float(), rtol=tolerance, atol=tolerance)


def test_plan_leaves_the_model_as_it_was(stock):
    """ak.plan runs the decoder for a plan only, for its own call: the model's decoder called after it computes
    stock's hidden states (no request left behind)."""
    inputs = example_inputs(stock, batch_size=2, seed=55, pad=[0, 2])
    model = patched(stock, "H")
    ak.plan(model, latency_budget=0.6, **inputs)
    with torch.no_grad():
        ours = model.model(**inputs, use_cache=False).last_hidden_state
        want = stock.model(**inputs, use_cache=False).last_hidden_state
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[real], want[real], **TOL)


def test_use_cache_given_in_the_call_overrides_the_config(stock):
    """use_cache=False in the call returns no cache, as stock returns none, though the config says use_cache=True;
    use_cache=True in the call returns one though the config says False."""
    inputs = example_inputs(stock, batch_size=2, seed=57, pad=[0, 2])
    model = patched(stock, "H")
    requests = ({}, {"execution_plan": random_plan(2, seed=58)}, {"latency_budget": 0.6})
    with torch.no_grad():
        assert model.config.text_config.use_cache and cache_of(stock(**inputs, use_cache=False)) is None
        for request in requests:
            assert cache_of(model(**inputs, use_cache=False, **request)) is None
        model.config.text_config.use_cache = False
        for request in requests:
            assert isinstance(cache_of(model(**inputs, use_cache=True, **request)), AdaptiveCache)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("request_kind", ["none", "full plan"])
def test_a_one_token_prompt_gives_stock_logits_and_ids(stock, request_kind, backend):
    """A prompt of one token (text only) has a decode step's shape but fills an empty cache: stock's logits and
    greedy ids (a kernel backend's first decode step attends over the cache's whole capacity)."""
    ids = torch.randint(1, 500, (2, 1), generator=torch.Generator().manual_seed(53))
    model = patched(stock, "H", backend=backend)
    plan = {"none": {}, "full plan": {"execution_plan": ExecutionPlan.full(2, L, H)}}[request_kind]
    run = dict(n=4, return_dict_in_generate=True, output_logits=True)
    ours, theirs = greedy(model, {"input_ids": ids}, **plan, **run), greedy(stock, {"input_ids": ids}, **run)
    assert torch.equal(ours.sequences, theirs.sequences)
    for got, want in zip(ours.logits, theirs.logits, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_hidden_states_the_config_asks_for_are_returned(stock):
    """output_hidden_states set in the configs, not in the call: the patched model returns stock's."""
    inputs = example_inputs(stock, batch_size=2, seed=59, pad=[0, 2])
    configured = copy.deepcopy(stock)
    for config in (configured.config, configured.config.text_config):
        config.output_hidden_states = True
    model = patched(configured, "L")
    with torch.no_grad():
        ours, theirs = model(**inputs).hidden_states, configured(**inputs).hidden_states
    assert theirs is not None and len(ours) == len(theirs) == L + 1
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, **TOL)


def test_hidden_states_are_the_masked_computation_layer_by_layer(stock):
    """output_hidden_states: the decoder's input, each layer's output (a skipped one's unchanged), the last normed."""
    inputs = example_inputs(stock, batch_size=3, seed=17, pad=[0, 2, 0])
    plan = random_plan(3, seed=19)
    for mask in (plan.layers, plan.heads, plan.groups):
        mask[:, 5] = False  # a layer no row runs, never called
    model = patched(stock, "H")
    with torch.no_grad():
        ours = model(**inputs, execution_plan=plan, output_hidden_states=True).hidden_states
        masked = masked_stock(stock, plan)(**inputs, output_hidden_states=True).hidden_states
    assert len(ours) == len(masked) == L + 1
    for got, want in zip(ours, masked):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("selection", [[1, -1], [0, L - 1, L + 3], [L, 2], 3, (2,)])
def test_hidden_states_selected_by_index_are_those_stock_selects(stock, selection):
    """output_hidden_states as indices: the states the installed transformers keeps (5.2x: of all states, negative
    ones from the end; earlier: of the layers' outputs), the others None, each the masked computation's. On the
    merged embeddings: stock's vision tower does not take a selection."""
    inputs = example_inputs(stock, batch_size=2, seed=23, pad=[0, 3])
    plan = random_plan(2, seed=29)
    request = dict(inputs_embeds=prompt_embeddings(stock, inputs), attention_mask=inputs["attention_mask"],
                   output_hidden_states=selection)
    with torch.no_grad():
        ours = patched(stock, "H")(**request, execution_plan=plan).hidden_states
        masked = masked_stock(stock, plan)(**request).hidden_states
    assert [h is None for h in ours] == [h is None for h in masked]
    assert any(h is not None for h in masked)
    for got, want in zip(ours, masked):
        if want is not None:
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("use_cache", [True, False])
def test_hidden_states_under_a_budget_are_the_masked_computation_fed_the_latency_token(stock, use_cache):
    """output_hidden_states with a budget: those of the prefix and the scheduled layers, and the logits, as the
    masked computation of the plan fed the prompt and the latency token has them, with a cache or without."""
    inputs = example_inputs(stock, batch_size=2, seed=91, pad=[0, 2])
    budgets = [0.6, 0.85]
    model = patched(stock, "H")
    plan = ak.plan(model, latency_budget=budgets, **inputs)
    with torch.no_grad():
        ours = model(**inputs, latency_budget=budgets, output_hidden_states=True, use_cache=use_cache)
        embeds, mask = fed_latency_token(model, stock, inputs, budgets)
        masked = masked_stock(stock, plan)(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(ours.logits, masked.logits, **TOL)
    assert torch.equal(ours.hidden_states[0], embeds)  # each row's latency token is its budget's, bit for bit
    assert len(ours.hidden_states) == len(masked.hidden_states) == L + 1
    for got, want in zip(ours.hidden_states, masked.hidden_states):
        torch.testing.assert_close(got, want, **TOL)


def test_returned_sequences_run_their_prompts_budget_or_plan(stock):
    """num_return_sequences repeats each prompt row; per-row budgets and plan rows are repeated with it."""
    inputs = example_inputs(stock, batch_size=2, seed=23, pad=[0, 2])
    model = patched(stock, "H")
    plan = ak.plan(model, latency_budget=[0.6, 0.9], **inputs)
    sample = dict(do_sample=True, top_k=1, max_new_tokens=3)  # sampling (so copies are allowed), deterministic
    with torch.no_grad():
        for given in ({"latency_budget": [0.6, 0.9]}, {"latency_budget": torch.tensor(0.7)}, {"execution_plan": plan}):
            alone = model.generate(**inputs, **given, **sample)
            copies = model.generate(**inputs, **given, num_return_sequences=2, **sample)
            assert torch.equal(copies[0::2], alone) and torch.equal(copies[1::2], alone), given
        # no prompt tensor (generate starts from the BOS token): a 0-d tensor budget, which generate cannot repeat
        # along a dim 0, runs each returned sequence as the float does
        alone = model.generate(latency_budget=0.5, **sample)
        copies = model.generate(latency_budget=torch.tensor(0.5), num_return_sequences=3, **sample)
    assert alone.shape[0] == 1 and torch.equal(copies, alone.expand(3, -1))


def test_a_request_serves_its_own_model_only(stock):
    """A hook on model A's projector calls patched model B's language model while A serves a budget: B serves no
    request there (every unit on, no latency token), as stock B."""
    a, b = patched(stock, "L"), patched(tiny_llava(seed=3), "L")
    stock_b = tiny_llava(seed=3).model.language_model
    embeds = torch.randn(1, 5, stock_b.config.hidden_size, generator=torch.Generator().manual_seed(34))
    seen = []
    a.model.multi_modal_projector.register_forward_pre_hook(
        lambda module, args: seen.append(b.model.language_model(inputs_embeds=embeds).last_hidden_state))
    with torch.no_grad():
        a(**example_inputs(stock, seed=35), latency_budget=0.5)
        (got,) = seen
        torch.testing.assert_close(got, stock_b(inputs_embeds=embeds).last_hidden_state, **TOL)


def test_layers_some_rows_run_whole_or_in_part_each_run_their_own_units(stock):
    """Rows 0 and 1 run layers 2, 4 and 5 and row 2 none of them: layer 2 with some of row 1's units off, layers 4 and
    5 whole. Layers that the same rows run whole share their index lists; a layer in part must not hand its lists to
    one run whole: the masked computation."""
    inputs = example_inputs(stock, batch_size=3, seed=33, pad=[0, 2, 0])
    layers, heads, groups = (torch.ones(3, L, dtype=torch.bool), torch.ones(3, L, H, dtype=torch.bool),
                             torch.ones(3, L, H, dtype=torch.bool))
    for layer in (2, 4, 5):
        layers[2, layer] = heads[2, layer] = groups[2, layer] = False
    heads[1, 2, :5] = groups[1, 2, ::2] = False
    plan = ExecutionPlan(layers, heads, groups)
    model = patched(stock, "H")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, execution_plan=plan).logits,
                                   masked_stock(stock, plan)(**inputs).logits, **TOL)


def test_beam_search_matches_sliced_stock_row_by_row(stock):
    """Beams of a prompt share its plan; the cache is reordered per layer over the rows that run it."""
    inputs = example_inputs(stock, batch_size=3, seed=29, pad=[0, 3, 0])
    plan = random_plan(3, seed=31)
    plan.layers[1, 5] = plan.heads[1, 5] = plan.groups[1, 5] = False  # a layer that only some rows run
    plan.layers[0, 5] = plan.heads[0, 5, 0] = True
    model = patched(stock, "H")
    beams = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                 output_scores=True)
    with torch.no_grad():
        ours = model.generate(**inputs, execution_plan=plan, **beams)
        for row in range(3):
            alone = sliced_stock(stock, plan, row).generate(**row_inputs(inputs, row), **beams)
            assert torch.equal(ours.sequences[2 * row:2 * row + 2], alone.sequences), row
            torch.testing.assert_close(ours.sequences_scores[2 * row:2 * row + 2], alone.sequences_scores, **TOL)


@pytest.mark.parametrize("variant,budget,text_tokens,steps,options",
                         [("L", 0.6, 12, 4, {}), ("H", 0.6, 12, 4, {}), ("H", 0.85, 12, 4, {}), ("L", 1.0, 12, 4, {}),
                          ("H", 0.6, 105, 10, {}),  # 121 prompt tokens: decode outgrows the cache's first 128
                          ("H", 0.6, 112, 3, {}),  # 128 prompt tokens: the latency token is the 129th position
                          ("L", 0.5, 12, 4, {"num_prefix_layers": 1}), ("H", 0.6, 12, 4, {"num_prefix_layers": 0}),
                          ("H", 0.9, 12, 4, {"num_prefix_layers": 6}),
                          ("H", 0.7, 12, 4, {"rank": 1}), ("H", 0.7, 12, 4, {"rank": 4})])
def test_budget_matches_sliced_stock_fed_latency_token(stock, variant, budget, text_tokens, steps, options):
    """A budget's prefill and decode logits are those of the stock model cut to ``ak.plan``'s plan and fed the
    latency token; at the default prefix (half the layers) and rank (2) and others."""
    inputs = example_inputs(stock, batch_size=1, seed=7, text_tokens=text_tokens)
    model = patched(stock, variant, **options)
    plan = ak.plan(model, latency_budget=budget, **inputs)
    with torch.no_grad():
        prefill = model(**inputs, latency_budget=budget).logits
        out = model.generate(**inputs, latency_budget=budget, max_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    prompt_len = inputs["input_ids"].shape[1]
    assert prompt_len == 16 + text_tokens and plan.seq_len == prompt_len + 1  # cost() weighs the positions run
    new_tokens = out.sequences[:, prompt_len:]
    assert out.sequences.shape[1] == prompt_len + steps
    assert torch.equal(out.sequences[:, :prompt_len], inputs["input_ids"])

    oracle = sliced_stock(stock, plan, 0)
    embeds, mask = fed_latency_token(model, stock, inputs, [budget])
    positions = torch.arange(prompt_len + 1)[None]
    steps = stock_decode_logits(oracle, embeds, mask, positions, new_tokens)
    assert prefill.shape[1] == prompt_len + 1
    torch.testing.assert_close(prefill, steps[0], **TOL)
    torch.testing.assert_close(out.logits[0], steps[0][:, -1], **TOL)
    for ours, theirs in zip(out.logits[1:], steps[1:]):
        torch.testing.assert_close(ours, theirs, **TOL)


def test_generate_continues_from_a_returned_cache(stock):
    """A second generate on prompt + answer + more tokens, given the first one's cache, takes only what the
    cache lacks: stock's continuation without a budget; with one, the sliced stock model's continuation of
    the prompt, the latency token and the rest (the latency token stays where the first prefill put it)."""
    inputs = example_inputs(stock, seed=37)
    more = torch.tensor([[5, 6, 7]])
    model = patched(stock, "H")
    run = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        for budget in (None, 0.6):
            plan = ak.plan(model, latency_budget=budget, **inputs) if budget else None
            first = model.generate(**inputs, latency_budget=budget, **run)
            ids = torch.cat([first.sequences, more], 1)
            cached = cache_of(first)
            prompt_len = inputs["input_ids"].shape[1]
            assert cached.get_seq_length() == prompt_len + (budget is not None) + 3  # the last new token is not fed
            again = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{CACHE_KWARG: cached}, **run)
            assert cached.get_seq_length() == cached.length  # generate's input-id view of the cache ended with it
            if budget is None:
                want = stock.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      pixel_values=inputs["pixel_values"], **run)
            else:
                embeds = torch.cat([prompt_embeddings(stock, inputs), ak.latency_embedding(model, budget)[None, None],
                                    stock.model.language_model.embed_tokens(ids[:, prompt_len:])], 1)
                want = sliced_stock(stock, plan, 0).generate(
                    inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), **run)
            assert torch.equal(again.sequences[:, ids.shape[1]:], want.sequences[:, -4:]), budget
            for ours, theirs in zip(again.logits, want.logits, strict=True):
                torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("hidden", ["first new token", "last prompt token"])
def test_a_decode_mask_that_hides_a_token_keeps_the_latency_token_in_place(stock, hidden):
    """Decode steps called by hand, the caller's mask (which knows nothing of the latency token) hiding the
    first new token, or the prompt's last one (right padding, hidden at prefill too): the sliced stock model
    fed prompt, latency token and new tokens under that mask."""
    inputs = example_inputs(stock, seed=61)
    S = inputs["input_ids"].shape[1]
    new = torch.randint(1, 500, (1, 2), generator=torch.Generator().manual_seed(67))
    mask = torch.ones(1, S + 2, dtype=torch.long)
    mask[0, S if hidden == "first new token" else S - 1] = 0
    inputs["attention_mask"] = mask[:, :S]
    model = patched(stock, "H")
    with torch.no_grad():
        plan = ak.plan(model, latency_budget=0.6, **inputs)
        cache = cache_of(model(**inputs, latency_budget=0.6, use_cache=True))
        model(input_ids=new[:, :1], attention_mask=mask[:, :S + 1], **{CACHE_KWARG: cache})
        ours = model(input_ids=new[:, 1:], attention_mask=mask, **{CACHE_KWARG: cache}).logits[:, -1]
        embeds = torch.cat([prompt_embeddings(stock, inputs), ak.latency_embedding(model, 0.6)[None, None],
                            stock.model.language_model.embed_tokens(new)], 1)
        want_mask = torch.cat([mask[:, :S], torch.ones(1, 1, dtype=torch.long), mask[:, S:]], 1)
        want = sliced_stock(stock, plan, 0)(inputs_embeds=embeds, attention_mask=want_mask).logits[:, -1]
    torch.testing.assert_close(ours, want, **TOL)


def test_labels_given_with_a_decode_step_under_a_budget_are_the_steps_own(stock):
    """Only the prefill appends the latency token's -100 to a budget's labels: a step that continues the
    cache (the budget given again) takes labels of its own tokens, whose loss is stock's over its logits."""
    inputs = example_inputs(stock, seed=64)
    new = torch.randint(1, 500, (1, 3), generator=torch.Generator().manual_seed(65))
    model = patched(stock, "H")
    with torch.no_grad():
        cache = cache_of(model(**inputs, latency_budget=0.6, use_cache=True))
        out = model(input_ids=new, labels=new, latency_budget=0.6, use_cache=True, **{CACHE_KWARG: cache})
    assert out.logits.shape[:2] == new.shape
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[0, :-1].float(), new[0, 1:]))


def test_the_latency_token_under_a_budget_adds_nothing_to_the_loss(stock):
    """The latency token predicts nothing and nothing predicts it: a budget's loss is the mean cross-entropy of
    its logits at the prompt's positions against the next prompt token, the padding's -100 left out."""
    inputs = example_inputs(stock, batch_size=2, seed=68, pad=[2, 0])
    labels = prompt_labels(inputs)
    S = labels.shape[1]
    model = patched(stock, "H")
    with torch.no_grad():
        out = model(**inputs, labels=labels, latency_budget=[0.6, 0.9])
        embedded = model(inputs_embeds=prompt_embeddings(stock, inputs), attention_mask=inputs["attention_mask"],
                         labels=labels, latency_budget=[0.6, 0.9])  # the prompt as embeddings, the same labels
    assert out.logits.shape[1] == S + 1
    want = F.cross_entropy(out.logits[:, :S - 1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(embedded.loss, want, **TOL)


def test_labels_given_with_a_reset_budget_cache_are_a_new_prompts(stock):
    """A reset cache holds no position, so a budget's call given it is a prefill: its labels get the latency
    token's -100 appended, and its loss is that of the same call given no cache."""
    inputs = example_inputs(stock, batch_size=2, seed=66, pad=[0, 2])
    labels = prompt_labels(inputs)
    model = patched(stock, "H")
    with torch.no_grad():
        cache = cache_of(model(**inputs, latency_budget=[0.6, 0.9], use_cache=True))
        cache.reset()
        ours = model(**inputs, labels=labels, latency_budget=[0.6, 0.9], use_cache=True, **{CACHE_KWARG: cache})
        fresh = model(**inputs, labels=labels, latency_budget=[0.6, 0.9])
    torch.testing.assert_close(ours.logits, fresh.logits)
    torch.testing.assert_close(ours.loss, fresh.loss)


@pytest.mark.parametrize("counted", ["without the latency token", "with the latency token"])
def test_decode_position_ids_given_by_hand_count_what_the_mask_counts(stock, counted):
    """A decode step called by hand with position_ids derived from its mask, as stock derives them (cumsum - 1):
    the mask and positions of generate (the caller's tokens only) and a mask with the latency token's column
    (the cache's length, positions counting the token) both give the sliced stock model's logits."""
    inputs = example_inputs(stock, seed=62)
    S = inputs["input_ids"].shape[1]
    new = torch.randint(1, 500, (1, 1), generator=torch.Generator().manual_seed(63))
    model = patched(stock, "H")
    with torch.no_grad():
        plan = ak.plan(model, latency_budget=0.6, **inputs)
        cache = cache_of(model(**inputs, latency_budget=0.6, use_cache=True))
        mask = torch.ones(1, S + 1 if counted == "without the latency token" else S + 2, dtype=torch.long)
        ours = model(input_ids=new, attention_mask=mask, position_ids=mask.cumsum(-1)[:, -1:] - 1,
                     **{CACHE_KWARG: cache}).logits[:, -1]
        embeds = torch.cat([prompt_embeddings(stock, inputs), ak.latency_embedding(model, 0.6)[None, None],
                            stock.model.language_model.embed_tokens(new)], 1)
        want = sliced_stock(stock, plan, 0)(inputs_embeds=embeds).logits[:, -1]
    torch.testing.assert_close(ours, want, **TOL)


def test_a_budget_cache_lacks_the_ids_past_its_length_less_the_latency_token(stock):
    """README's slice for continuing a budget request by hand: the cache holds the latency token, so the caller's
    ids it lacks start at get_seq_length() - 1; fed those with the caller's mask (as long as the ids), the model
    gives the sliced stock model's logits on the prompt, the latency token and every id after the prompt."""
    inputs = example_inputs(stock, seed=64)
    S = inputs["input_ids"].shape[1]
    model = patched(stock, "H")
    with torch.no_grad():
        out = model.generate(**inputs, latency_budget=0.6, max_new_tokens=3, do_sample=False, eos_token_id=None,
                             return_dict_in_generate=True)
        cache = cache_of(out)
        ids = torch.cat([out.sequences, torch.randint(1, 500, (1, 2), generator=torch.Generator().manual_seed(65))], 1)
        mask = torch.ones_like(ids)
        lacking = ids[:, cache.get_seq_length() - 1:]
        ours = model(input_ids=lacking, attention_mask=mask, **{CACHE_KWARG: cache}).logits
        embeds = torch.cat([prompt_embeddings(stock, inputs), ak.latency_embedding(model, 0.6)[None, None],
                            stock.model.language_model.embed_tokens(ids[:, S:])], 1)
        want = sliced_stock(stock, cache.plan, 0)(inputs_embeds=embeds).logits[:, -lacking.shape[1]:]
    assert lacking.shape[1] == 3  # the last generated id, never fed, and the caller's two
    torch.testing.assert_close(ours, want, **TOL)


def test_assisted_decoding_gives_stock_logits(stock):
    """Prompt lookup proposes draft tokens that the model verifies; rejected ones are cropped from the cache."""
    inputs = example_inputs(stock, text_tokens=20, seed=41)
    inputs["input_ids"][0, -8:] = inputs["input_ids"][0, -16:-8]  # repeated text: drafts get proposed
    model = patched(stock, "H")
    run = dict(n=12, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    want = greedy(stock, inputs, **run)
    for given in ({}, {"execution_plan": ExecutionPlan.full(1, L, H)}):
        ours = greedy(model, inputs, prompt_lookup_num_tokens=3, **given, **run)
        assert torch.equal(ours.sequences, want.sequences)
        for got, theirs in zip(ours.logits, want.logits, strict=True):
            torch.testing.assert_close(got, theirs, **TOL)


def test_a_plan_edited_in_place_after_its_prefill_changes_nothing_of_that_request(stock):
    """The cache keeps a copy of the plan its prefill ran: the caller's later edits of the masks change neither
    its plan nor its continuation under the original plan, the sliced stock model's."""
    inputs = example_inputs(stock, seed=44)
    model = patched(stock, "H")
    plan = random_plan(1, seed=45)
    original = ExecutionPlan(plan.layers.clone(), plan.heads.clone(), plan.groups.clone())
    run = dict(do_sample=False, eos_token_id=None)
    with torch.no_grad():
        first = model.generate(**inputs, execution_plan=plan, max_new_tokens=3, return_dict_in_generate=True, **run)
        plan.heads[:], plan.groups[:] = ~plan.heads & plan.layers[..., None], ~plan.groups & plan.layers[..., None]
        cached = cache_of(first)
        assert cached.plan == original and cached.plan != plan
        ids = first.sequences
        again = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), execution_plan=original,
                               max_new_tokens=3, **{CACHE_KWARG: cached}, **run)
    assert torch.equal(again, greedy(sliced_stock(stock, original, 0), inputs, n=6, eos_token_id=None))


@pytest.mark.parametrize("edited_after_call", [1, 2])
def test_a_plan_edited_in_place_while_generate_runs_changes_nothing_of_that_request(stock, edited_after_call):
    """generate passes the caller's plan again at every step: edited in place between steps (here by a logits
    processor), right after the prefill or after a decode step, it is still that request's own plan, not another
    to refuse, and the request runs on under its prefill's copy, as the sliced stock model does."""
    inputs = example_inputs(stock, seed=46)
    model = patched(stock, "H")
    plan = random_plan(1, seed=47)
    want = greedy(sliced_stock(stock, plan, 0), inputs, n=4, eos_token_id=None)

    class EditThePlan(LogitsProcessor):
        calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == edited_after_call:
                plan.heads[:] = ~plan.heads & plan.layers[..., None]
            return scores

    editor = EditThePlan()
    ours = greedy(model, inputs, n=4, execution_plan=plan, eos_token_id=None,
                  logits_processor=LogitsProcessorList([editor]))
    assert editor.calls == 4 and torch.equal(ours, want)


def test_a_draft_model_proposes_without_the_plan_that_the_patched_model_verifies(stock):
    """An assistant_model drafts as itself (it gets the inputs, not the plan), and the patched model verifies
    the drafts under its plan: the ids and logits are the sliced stock model's, whether the drafts are
    rejected (stock's whole model proposes other ids here) or accepted (the sliced model's own)."""
    inputs = example_inputs(stock, seed=43)
    model = patched(stock, "H")
    plan = ak.plan(model, latency_budget=0.6, **inputs)
    assert not plan.heads.all()
    run = dict(n=12, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    want = greedy(sliced_stock(stock, plan, 0), inputs, **run)
    for draft in (copy.deepcopy(stock), sliced_stock(stock, plan, 0)):
        ours = greedy(model, inputs, execution_plan=plan, assistant_model=draft, **run)
        assert torch.equal(ours.sequences, want.sequences)
        for got, theirs in zip(ours.logits, want.logits, strict=True):
            torch.testing.assert_close(got, theirs, **TOL)


def _units(variant: str, budget: float) -> int:
    """ADALLAVA.md's unit count, in exact rational arithmetic."""
    P = L // 2
    if variant == "L":
        return max(0, math.floor(L * Fraction(str(budget))) - P)
    per_layer = H // 2
    return max(0, math.floor(L * per_layer * Fraction(str(budget))) - P * per_layer)


@pytest.mark.parametrize("variant", ["L", "H"])
def test_plans_spend_exactly_the_budget_and_keep_the_prefix(stock, variant):
    model = patched(stock, variant)
    budgets = [0.3, 0.5, 0.55, 0.6, 0.7, 0.85, 0.95, 1.0]
    inputs = example_inputs(stock, batch_size=len(budgets), seed=2)
    plan = ak.plan(model, latency_budget=budgets, **inputs)
    assert plan == ak.plan(model, latency_budget=torch.tensor(budgets), **inputs)
    assert plan.layers[:, :L // 2].all() and plan.heads[:, :L // 2].all() and plan.groups[:, :L // 2].all()
    for row, b in enumerate(budgets):
        if variant == "L":
            assert int(plan.layers[row, L // 2:].sum()) == _units("L", b)
            assert torch.equal(plan.heads[row], plan.layers[row, :, None].expand(-1, H))
        else:
            assert int(plan.heads[row, L // 2:].sum()) == 2 * _units("H", b)
            assert int(plan.groups[row, L // 2:].sum()) == 2 * _units("H", b)
            assert torch.equal(plan.heads[row].sum(-1), plan.groups[row].sum(-1))
    for row, b in enumerate(budgets):
        alone = ak.plan(model, latency_budget=b, **row_inputs(inputs, row))
        assert alone == plan.rows(slice(row, row + 1))


def test_batch_rows_get_what_they_get_alone(stock):
    budgets = [0.5, 1.0, 0.7]
    inputs = example_inputs(stock, batch_size=3, seed=4, pad=[0, 2, 4])
    model = patched(stock, "H")
    with torch.no_grad():
        batch_logits = model(**inputs, latency_budget=budgets).logits
    batch_tokens = greedy(model, inputs, latency_budget=budgets)
    for row, b in enumerate(budgets):
        real = inputs["attention_mask"][row].bool()
        alone = {k: v[row:row + 1, real] if k != "pixel_values" else v[row:row + 1] for k, v in inputs.items()}
        with torch.no_grad():
            logits = model(**alone, latency_budget=b).logits
        keep = torch.cat([real, torch.tensor([True])])
        torch.testing.assert_close(batch_logits[row:row + 1, keep], logits, **TOL)
        tokens = greedy(model, alone, latency_budget=b)
        assert torch.equal(batch_tokens[row, -5:], tokens[0, -5:])


def test_plan_reads_the_latency_token_as_generate_runs_it(stock):
    """ak.plan counts positions from the attention mask, as generate does, so its scheduler reads the latency
    token's state that generate's does, bit for bit, and picks generate's plan: counted by column, a right-padded
    row's token sat past its padding, and a left-padded row's positions were shifted (rounding otherwise)."""
    model = patched(stock, "H")
    inputs = example_inputs(stock, batch_size=3, seed=72, pad=[0, 2, 0])
    inputs["input_ids"][2, -3:], inputs["attention_mask"][2, -3:] = 0, 0  # right padding
    scheduler = model.model.language_model.latency_scheduler
    states, select = [], scheduler.select
    scheduler.select = lambda state, *args, **kw: states.append(state.clone()) or select(state, *args, **kw)
    plan = ak.plan(model, latency_budget=[0.6, 0.7, 0.8], **inputs)
    with torch.no_grad():
        out = model.generate(**inputs, latency_budget=[0.6, 0.7, 0.8], max_new_tokens=1, do_sample=False,
                             return_dict_in_generate=True)
    assert len(states) == 2 and torch.equal(states[0], states[1]) and cache_of(out).plan == plan


def test_plan_reads_position_ids_given_rather_than_counting_the_mask(stock):
    """ak.plan counts positions from the mask only without ``position_ids``: given ones (increasing, with gaps)
    place the prompt, and the latency token one past the prompt's last. Its scheduler reads the latency token's
    state as a stock model fed those positions computes it (not the mask's positions', which differ), and its plan
    is that state's top-n."""
    model = patched(stock, "H")
    inputs = example_inputs(stock, batch_size=3, seed=19)
    S, P = inputs["input_ids"].shape[1], model.model.language_model.latency_scheduler.units.num_prefix_layers
    position_ids = torch.randint(1, 18, (3, S), generator=torch.Generator().manual_seed(23)).cumsum(-1)
    budgets = [0.6, 0.75, 0.9]
    scheduler = model.model.language_model.latency_scheduler
    states, select = [], scheduler.select
    scheduler.select = lambda state, *args, **kw: states.append(state.clone()) or select(state, *args, **kw)
    with torch.no_grad():
        plan = ak.plan(model, latency_budget=budgets, position_ids=position_ids, **inputs)
        embeds, mask = fed_latency_token(model, stock, inputs, budgets)
        want = {}
        for name, positions in (("given", torch.cat([position_ids, position_ids[:, -1:] + 1], 1)),
                                ("counted", torch.arange(S + 1).expand(3, -1))):
            want[name] = stock.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                                    output_hidden_states=True).hidden_states[P][:, -1]
        layers, heads, groups = select(want["given"], budgets)
    (state,) = states
    torch.testing.assert_close(state, want["given"], rtol=1e-5, atol=2e-6)
    assert (want["given"] - want["counted"]).abs().max() > 1e-4  # the positions matter to the state
    assert plan.layers[:, :P].all() and torch.equal(plan.layers[:, P:], layers)
    assert torch.equal(plan.heads[:, P:], heads) and torch.equal(plan.groups[:, P:], groups)


def test_right_padded_rows_put_the_latency_token_after_their_real_tokens(stock):
    """Right-padded prompts under per-row budgets: each row gives the sliced stock model's generate on its
    prompt then the latency token (positions counted from the mask: the token at the row's real length, not
    one past its padding), decode positions going on from there; also when a second generate continues the
    returned cache with the answer and more tokens (its positions counted from its own mask)."""
    budgets, pads = [0.6, 0.8, 0.7], [0, 3, 5]
    inputs = example_inputs(stock, batch_size=3, seed=71)
    for row, n in enumerate(pads):  # the last n text tokens become padding
        if n:
            inputs["input_ids"][row, -n:], inputs["attention_mask"][row, -n:] = 0, 0
    model = patched(stock, "H")
    run = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    more = torch.tensor([[5, 6]] * 3)
    with torch.no_grad():
        plan = ak.plan(model, latency_budget=budgets, **inputs)
        first = model.generate(**inputs, latency_budget=budgets, **run)
        ids = torch.cat([first.sequences, more], 1)
        mask = F.pad(inputs["attention_mask"], (0, ids.shape[1] - inputs["input_ids"].shape[1]), value=1)
        again = model.generate(input_ids=ids, attention_mask=mask, **{CACHE_KWARG: cache_of(first)}, **run)
        embeds, fed_mask = fed_latency_token(model, stock, inputs, budgets)
        answer = stock.model.language_model.embed_tokens(ids[:, inputs["input_ids"].shape[1]:])
        for row in range(3):
            oracle = sliced_stock(stock, plan, row)
            for ours, prompt, prompt_mask in ((first, embeds, fed_mask),
                                              (again, torch.cat([embeds, answer], 1), F.pad(fed_mask, (0, 6), value=1))):
                want = oracle.generate(inputs_embeds=prompt[row:row + 1], attention_mask=prompt_mask[row:row + 1], **run)
                assert torch.equal(ours.sequences[row, -4:], want.sequences[0]), row
                for got, theirs in zip(ours.logits, want.logits, strict=True):
                    torch.testing.assert_close(got[row:row + 1], theirs, **TOL)


def test_positions_given_by_column_put_the_latency_token_past_the_last_column(stock):
    """position_ids 0..S-1 given for a right-padded prompt (not generate's, which count the mask): the latency
    token at S, as stock fed positions 0..S gives a token appended to the prompt; every position's logits."""
    inputs = example_inputs(stock, batch_size=2, seed=73)
    inputs["attention_mask"][1, -4:] = 0
    S = inputs["input_ids"].shape[1]
    model = patched(stock, "H")
    with torch.no_grad():
        plan = ak.plan(model, latency_budget=0.7, **inputs)
        ours = model(**inputs, position_ids=torch.arange(S)[None], latency_budget=0.7).logits
        embeds, mask = fed_latency_token(model, stock, inputs, [0.7, 0.7])
        for row in range(2):
            want = sliced_stock(stock, plan, row)(inputs_embeds=embeds[row:row + 1], attention_mask=mask[row:row + 1],
                                                  position_ids=torch.arange(S + 1)[None]).logits
            torch.testing.assert_close(ours[row:row + 1], want, **TOL)


def test_threads_sharing_a_model_each_run_their_own_request(stock):
    """A budget, a given plan and ak.plan, called again and again from three threads on one patched model,
    each give what they give alone (the request a call serves is its thread's, not the model's)."""
    model = patched(stock, "L")
    inputs = example_inputs(stock, batch_size=1, seed=6)
    given = random_plan(1, seed=7)
    calls = {"budget": lambda: model(**inputs, latency_budget=0.55).logits,
             "plan": lambda: model(**inputs, execution_plan=given).logits,
             "ak.plan": lambda: ak.plan(model, latency_budget=1.0, **inputs).layers}
    with torch.no_grad():
        alone = {name: call() for name, call in calls.items()}
    start, wrong = threading.Barrier(len(calls)), []

    def repeat(name):
        start.wait()
        for _ in range(20):
            with torch.no_grad():
                if not torch.equal(calls[name](), alone[name]):
                    wrong.append(name)

    threads = [threading.Thread(target=repeat, args=(name,)) for name in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, wrong


def test_a_request_begun_while_an_unpatch_runs_is_refused(stock, monkeypatch):
    """A request that starts while an unpatch is half done (here from within it, as a hook or another thread
    would start one) is refused by name before it runs, and the unpatch completes to stock."""
    model = patched(stock, "H")
    inputs = example_inputs(stock, batch_size=1, seed=43)
    raised = []
    swap_out = ak.swap_out

    def request_then_swap_out(m):
        with torch.no_grad(), pytest.raises(ValueError) as refused:
            m(**inputs, latency_budget=0.6)
        raised.append(refused.value)
        swap_out(m)

    monkeypatch.setattr(ak, "swap_out", request_then_swap_out)
    ak.unpatch(model)
    (error,) = raised
    assert str(error).startswith("model: patched or unpatched while this request ran"), error
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock(**inputs).logits)


@pytest.mark.parametrize("where", ["another thread", "a hook"])
@pytest.mark.parametrize("change", ["unpatch", "patch L"])
@pytest.mark.parametrize("call", ["forward", "generate", "ak.plan"])
def test_a_request_that_a_patch_or_unpatch_overlaps_is_refused(stock, call, change, where):
    """A patch or unpatch while a request ran (here while its vision tower ran) changed the layers under it: the
    request gave stock's result, or one of two plans mixed, without a word. It is refused; the change holds."""
    model = patched(stock, "H")
    inputs = example_inputs(stock, seed=12)
    apply = {"unpatch": lambda: ak.unpatch(model), "patch L": lambda: ak.patch(model, "L")}[change]
    requests = {"forward": lambda: model(**inputs, latency_budget=0.6),
                "generate": lambda: model.generate(**inputs, latency_budget=0.6, max_new_tokens=2),
                "ak.plan": lambda: ak.plan(model, latency_budget=0.6, **inputs)}
    reached, changed = threading.Event(), threading.Event()

    def in_the_request(*_):
        if where == "a hook":
            apply()
        else:
            reached.set()
            changed.wait(timeout=60)

    def other_thread():
        reached.wait(timeout=60)
        apply()
        changed.set()

    handle = model.model.vision_tower.register_forward_hook(in_the_request)
    thread = threading.Thread(target=other_thread)
    if where == "another thread":
        thread.start()
    try:
        with torch.no_grad(), pytest.raises(ValueError, match="^model: patched or unpatched while this request ran"):
            requests[call]()
    finally:
        handle.remove()
        reached.set()
        if where == "another thread":
            thread.join()
    assert llava_module.is_patched(model) == (change == "patch L")
    if change == "patch L":
        assert model.model.language_model._ak_settings.units.variant == "L"
        with torch.no_grad():
            assert torch.equal(model(**inputs, latency_budget=0.6).logits,
                               patched(stock, "L")(**inputs, latency_budget=0.6).logits)


@pytest.mark.parametrize("first", ["generate", "ak.plan", "latency_embedding", "graph_safe"])
def test_training_after_a_request_under_inference_mode_is_a_fresh_models(stock, first):
    """A budget's Fourier features, kept for later requests, were made as inference tensors by a request under
    torch.inference_mode, which training at that budget after it could not save for backward (stock trains after
    the same). They are made as normal tensors: the loss and the scheduler's gradients are a fresh model's."""
    inputs = example_inputs(stock, batch_size=2, seed=13)

    def within_graph_safe(model):
        with ak.graph_safe():
            model(**inputs, latency_budget=0.6)

    requests = {"generate": lambda m: m.generate(**inputs, latency_budget=0.6, max_new_tokens=2),
                "ak.plan": lambda m: ak.plan(m, latency_budget=0.6, **inputs),
                "latency_embedding": lambda m: ak.latency_embedding(m, 0.6), "graph_safe": within_graph_safe}

    def trained(model):
        model.train()
        torch.manual_seed(14)  # the same sampled plan
        loss = model(**inputs, labels=prompt_labels(inputs), latency_budget=0.6).loss
        loss.backward()
        return loss.detach(), [p.grad for p in model.model.language_model.latency_scheduler.parameters()]

    model = patched(stock, "H")
    with torch.inference_mode():
        requests[first](model)
    (loss, grads), (fresh_loss, fresh_grads) = trained(model), trained(patched(stock, "H"))
    assert torch.equal(loss, fresh_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, fresh_grads, strict=True))


@pytest.mark.parametrize("graphs", [False, True])
def test_a_cache_filled_under_inference_mode_is_continued_outside_it(stock, monkeypatch, graphs):
    """Its key and value buffers (and, with decode steps replayed as graphs, the graph's inputs) were inference
    tensors, which a later call outside inference mode could not write, where stock's DynamicCache continues.
    Continued past its capacity, it gives the ids of the request run whole outside inference mode."""
    if graphs:
        cpu_decode_graphs(monkeypatch)
    model = patched(stock, "H")
    if graphs:
        replaying_decode_steps(model)
    inputs = example_inputs(stock, seed=15)
    run = dict(latency_budget=0.6, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    with torch.inference_mode():
        first = model.generate(**inputs, max_new_tokens=3, **run)
    more = CAPACITY_STEP - first.sequences.shape[1] + 4
    with torch.no_grad():
        continued = model.generate(input_ids=first.sequences, attention_mask=torch.ones_like(first.sequences),
                                   max_new_tokens=more, **{CACHE_KWARG: cache_of(first)}, **run)
        whole = model.generate(**inputs, max_new_tokens=3 + more, **run)
    assert torch.equal(continued.sequences, whole.sequences)


@pytest.mark.parametrize("variant, request_kind", [("L", "budgets"), ("H", "budgets"), ("L", "plan")])
def test_a_cache_of_rows_on_different_layers_filled_under_inference_mode_is_continued_with_grad(stock, variant,
                                                                                                request_kind):
    """Where the rows of a batch run different layers, the cache keeps the list of the rows each layer runs; made
    under torch.inference_mode it was an inference tensor, which a call continuing the cache outside it with grad
    on (torch's default; stock's DynamicCache continues there) saves for backward and could not. It is a normal
    tensor: the step's logits are those of the request run whole outside inference mode."""
    model = patched(stock, variant)
    inputs = example_inputs(stock, batch_size=2, seed=16)
    request = dict(latency_budget=[0.5, 0.9])
    if request_kind == "plan":
        plan = ExecutionPlan.full(2, L, H)
        for mask in (plan.layers, plan.heads, plan.groups):
            mask[0, 5:] = False
        request = dict(execution_plan=plan)

    def next_step(first):
        ids = first.logits[:, -1:].argmax(-1)
        mask = torch.ones(2, first.logits.shape[1] + 1, dtype=torch.long)
        return model(input_ids=ids, attention_mask=mask, **{CACHE_KWARG: cache_of(first)}, **request).logits

    with torch.inference_mode():
        first = model(**inputs, use_cache=True, **request)
    assert torch.equal(next_step(first), next_step(model(**inputs, use_cache=True, **request)))


def test_skipped_layers_are_never_called(stock):
    model = patched(stock, "L")
    inputs = example_inputs(stock, batch_size=1, seed=8)
    plan = ak.plan(model, latency_budget=0.6, **inputs)
    calls = [0] * L
    for l, layer in enumerate(model.model.language_model.layers):
        for module in layer.modules():
            module.register_forward_hook(lambda *a, l=l: calls.__setitem__(l, calls[l] + 1))
    greedy(model, inputs, n=4, latency_budget=0.6)
    for l in range(L):
        assert (calls[l] > 0) == bool(plan.layers[0, l]), (l, calls)


def test_no_weight_is_copied_per_call(stock):
    """Invariant 2 on the torch backend too: a plan's partial layers (variant H) read their weight runs as views."""
    model = patched(stock, "H", backend="torch")
    inputs = example_inputs(stock, batch_size=2, seed=8)
    plan = ak.plan(model, latency_budget=[0.6, 0.8], **inputs)
    assert not (plan.heads.all(-1) & plan.groups.all(-1) | ~plan.layers).all()  # some layer runs in part
    projections = model.model.language_model.layers.named_parameters()
    watched = WeightCopies(p for name, p in projections if "_proj." in name)  # norm scales are read whole
    with watched:
        greedy(model, inputs, n=3, latency_budget=[0.6, 0.8])
    assert watched.copies == []


def test_compiled_forward_gives_the_eager_result(stock):
    """torch.compile (the eager backend: tracing, not code generation) of a patched forward, with a budget and
    with a plan whose layers run some of their units, gives the eager logits."""
    inputs = example_inputs(stock, batch_size=2, seed=39)
    model = patched(stock, "H")
    compiled = torch.compile(model.forward, backend="eager")
    with torch.no_grad():
        for given in ({"latency_budget": [0.6, 0.8]}, {"execution_plan": random_plan(2, seed=40)}):
            torch.testing.assert_close(compiled(**inputs, **given).logits, model(**inputs, **given).logits,
                                       rtol=0, atol=0)


@pytest.mark.parametrize("how", ["argument", "config"])
def test_the_language_model_returns_a_tuple_where_stock_does(stock, how):
    """return_dict=False, or a text config whose return_dict is False, makes stock's language model return a tuple;
    the patched one returned its output object, which code unpacking the tuple took for the hidden state."""
    model, reference = patched(stock, "H"), copy.deepcopy(stock)
    ids = example_inputs(stock, batch_size=2, seed=41)["input_ids"]
    if how == "config":
        for m in (model, reference):
            m.model.language_model.config.return_dict = False
    given = {"return_dict": False} if how == "argument" else {}
    with torch.no_grad():
        ours, theirs = (m.model.language_model(input_ids=ids, **given) for m in (model, reference))
    assert type(ours) is type(theirs) is tuple and len(ours) == len(theirs)
    assert torch.equal(ours[0], theirs[0])


def test_cache_answers_the_cache_api_or_refuses(stock):
    """The transformers Cache methods an AdaptiveCache inherits (and cannot serve from stock layers) answer
    for the compact cache, or refuse by name: a reset cache starts a new request, as a reset stock one does."""
    inputs = example_inputs(stock, batch_size=2, seed=38)
    model = patched(stock, "H")
    with torch.no_grad():
        fresh = model(**inputs, latency_budget=0.6)
        cache = cache_of(fresh)
        S = inputs["input_ids"].shape[1] + 1
        assert (cache.batch_size, cache.get_max_length(), cache.get_mask_sizes(1, 0)) == (2, -1, (S + 1, 0))
        for call in (lambda: cache.batch_repeat_interleave(2), lambda: cache.batch_select_indices(torch.tensor([1]))):
            with pytest.raises(NotImplementedError, match="AdaptiveCache cannot"):
                call()
        with pytest.raises(ValueError, match="linear-attention"):
            cache.has_previous_state()
        cache.reset()
        assert cache.get_seq_length() == 0 and all(k is None for k in cache.keys)
        again = model(**inputs, latency_budget=0.6, **{CACHE_KWARG: cache})
        assert torch.equal(again.logits, fresh.logits)
        cache.reset()  # given to a prefill again: reset, it starts a new request again
        assert torch.equal(model(**inputs, latency_budget=0.6, **{CACHE_KWARG: cache}).logits, fresh.logits)
        ak.unpatch(model)  # stock attention layers would write into it: refused by name
        with pytest.raises(ValueError, match="a stock model .* cannot continue it"):
            model(input_ids=inputs["input_ids"][:, -1:], **{CACHE_KWARG: cache_of(again)})


@pytest.mark.parametrize("view,argument,kept_positions", [
    (False, -3, 17), (False, 0, 20), (False, 12, 12), (False, 50, 20), (False, -9, 11),
    (True, -3, 17), (True, 15, 16), (True, 11, 12), (True, 10, 11), (True, 50, 20), (False, -25, 0),
    (True, -25, 0)])
def test_cache_crop_forgets_the_last_positions_or_keeps_as_many_as_it_counts(view, argument, kept_positions):
    """20 filled positions, the latency token at 10: crop(-k) forgets the last k; crop(n > 0) keeps n as
    get_seq_length counts them, so in an input_id_view n input ids, with the latency token if it is among them;
    asked to forget more than it holds, it forgets them all."""
    cache = AdaptiveCache(decoder_with(2), latency_index=10)
    cache.length = 20
    if view:
        with cache.input_id_view():
            cache.crop(argument)
            if argument > 0:
                assert cache.get_seq_length() == min(argument, 19)
    else:
        cache.crop(argument)
    assert cache.length == kept_positions


@pytest.mark.parametrize("view,argument", [(False, -10), (False, -15), (False, 10), (False, 3), (True, -10),
                                           (True, 9), (True, 5)])
def test_a_crop_that_would_drop_the_latency_token_is_refused(view, argument):
    """The prompt kept without the latency token it was planned from: a continuation ran its new tokens one
    position late under a plan no token had made (2e-2 off the request), and the cache miscounted after. The
    refusal counts as get_seq_length does: positions, or in an input_id_view input ids."""
    cache = AdaptiveCache(decoder_with(2), latency_index=10)
    cache.length = 20
    counted = "19 cached input ids .* at least 10" if view else "20 cached positions .* at least 11"
    with cache.input_id_view() if view else contextlib.nullcontext():
        with pytest.raises(ValueError, match=f"crop: keeping .* of {counted}"):
            cache.crop(argument)
    assert cache.length == 20  # left as it was


@pytest.mark.parametrize("variant", ["L", "H"])
def test_cache_holds_only_executed_layers_and_heads(stock, variant):
    """Per layer, the rows that run it and, per row, its key/value heads with a query head on, ascending: the keys
    and values the masked computation fed the latency token caches for them."""
    model = patched(stock, variant)
    inputs = example_inputs(stock, batch_size=2, seed=9)
    budgets, run = [0.6, 0.8], dict(max_new_tokens=3, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(**inputs, latency_budget=budgets, **run)
        cache = cache_of(out)
        assert isinstance(cache, AdaptiveCache)
        plan = cache.plan
        embeds, mask = fed_latency_token(model, stock, inputs, budgets)
        masked = masked_stock(stock, plan).generate(inputs_embeds=embeds, attention_mask=mask, **run)
    S = inputs["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, S:], masked.sequences)
    for l in range(L):
        kv_on = plan.heads[:, l].view(2, KV, H // KV).any(-1)
        rows = plan.layers[:, l].nonzero().flatten()
        stored = cache.layer(l)
        if len(rows) == 0:
            assert stored is None
            continue
        keys, values = stored
        assert keys.shape[0] == len(rows) and keys.shape[1] == int(kv_on[rows].sum(-1).max())
        assert keys.shape[2] == S + 1 + 2 and keys.shape == values.shape
        theirs = cache_of(masked).layers[l]
        for slot, row in enumerate(rows.tolist()):
            heads = kv_on[row].nonzero().flatten()
            torch.testing.assert_close(keys[slot, :len(heads)], theirs.keys[row, heads], **TOL)
            torch.testing.assert_close(values[slot, :len(heads)], theirs.values[row, heads], **TOL)


@pytest.mark.parametrize("differs_in", ["heads", "groups", "layers", "layers only"])
def test_beam_reordering_keeps_each_row_within_its_plan(differs_in):
    """reorder_cache moves a row's keys and values only between rows of one plan: rows that differ in a head, a
    group or a layer are refused, also where one row skips a layer the other runs with no unit on (the same
    head and group masks, but only the running row has keys there); the identity is not."""
    masks = {"layers": torch.ones(2, 2, dtype=torch.bool), "heads": torch.ones(2, 2, 4, dtype=torch.bool),
             "groups": torch.ones(2, 2, 4, dtype=torch.bool)}
    if differs_in == "layers":
        for mask in masks.values():
            mask[1, 1] = False
    elif differs_in == "layers only":
        masks["layers"][1, 1] = False
        masks["heads"][:, 1] = masks["groups"][:, 1] = False
    else:
        masks[differs_in][1, 1, 0] = False
    cache = AdaptiveCache(decoder_with(2), None, Schedule(ExecutionPlan(**masks), [None, None]))
    with pytest.raises(ValueError, match="beam_idx moves rows between different plans"):
        cache.reorder_cache(torch.tensor([1, 1]))
    cache.reorder_cache(torch.tensor([0, 1]))


def test_a_budget_prompt_that_fills_a_capacity_step_makes_room_for_its_latency_token(stock):
    """A prompt of CAPACITY_STEP tokens under a budget fills CAPACITY_STEP + 1 positions: the prefill reserves
    the latency token's too, and its logits are those of the masked computation fed that token."""
    ids = torch.randint(1, 500, (2, CAPACITY_STEP), generator=torch.Generator().manual_seed(61))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    budgets = [0.6, 0.85]
    model = patched(stock, "H")
    plan = ak.plan(model, latency_budget=budgets, **inputs)
    with torch.no_grad():
        ours = model(**inputs, latency_budget=budgets)
        embeds, mask = fed_latency_token(model, stock, inputs, budgets)
        masked = masked_stock(stock, plan)(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(ours.logits, masked, **TOL)
    assert cache_of(ours).length == CAPACITY_STEP + 1 <= cache_of(ours).capacity


def test_a_cache_that_grows_drops_its_graph_and_warms_up_again():
    """New buffers (and kernel specialisations) for a larger capacity: one eager step before a new capture."""
    cache = AdaptiveCache(decoder_with(2), None)
    cache.reserve(100)
    cache.warm, cache.decode_graph = True, object()
    cache.reserve(128)  # still fits
    assert cache.warm and cache.decode_graph is not None
    cache.reserve(129)
    assert not cache.warm and cache.decode_graph is None


def test_a_cache_that_grows_keeps_every_filled_position():
    """Growing past a capacity step moves each executed layer's filled keys and values, every position of
    every row and head, to the new buffers; a layer no row runs stays empty. (Every long LLaVA request
    crosses steps: 576 image tokens alone fill four and a half.)"""
    g = torch.Generator().manual_seed(82)
    cache = AdaptiveCache(decoder_with(3), None)
    cache.reserve(CAPACITY_STEP)
    keys, values = (torch.randn(2, 3, CAPACITY_STEP, 4, generator=g) for _ in "kv")
    cache.append(0, keys, values)
    cache.append(2, keys[:, :1] + 1, values[:, :1] + 1)
    cache.length = CAPACITY_STEP
    cache.reserve(CAPACITY_STEP + 1)
    assert cache.capacity == 2 * CAPACITY_STEP and cache.layer(1) is None
    assert all(torch.equal(got, want) for got, want in zip(cache.layer(0), (keys, values)))
    assert all(torch.equal(got, want) for got, want in zip(cache.layer(2), (keys[:, :1] + 1, values[:, :1] + 1)))


def test_reset_drops_the_buffers_the_decode_graph_and_its_warm_up():
    """A reset cache starts a new request: its buffers are freed and no graph captured on them is replayed."""
    cache = AdaptiveCache(decoder_with(2), None)
    cache.reserve(200)
    cache.append(0, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    cache.length, cache.warm, cache.decode_graph = 5, True, object()
    cache.reset()
    assert cache.length == 0 and cache.capacity == 0 and all(k is None for k in cache.keys + cache.values)
    assert not cache.warm and cache.decode_graph is None


def test_generate_given_a_reset_budget_cache_starts_a_new_request(stock):
    """A cache that a budget request filled (its latency token at the prompt's end) and that was then reset holds
    no position: generate given it counts no cached input id, feeds the whole prompt, and returns the ids a
    fresh budget request returns; the reset cache's input-id view counts 0, not -1 for a latency token it lost."""
    inputs = example_inputs(stock, batch_size=2, seed=43)
    model = patched(stock, "H")
    run = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        first = model.generate(**inputs, latency_budget=[0.6, 0.85], **run)
        cache = cache_of(first)
        assert cache.latency_index == inputs["input_ids"].shape[1]
        cache.reset()
        with cache.input_id_view():
            assert cache.get_seq_length() == 0
        again = model.generate(**inputs, latency_budget=[0.6, 0.85], **{CACHE_KWARG: cache}, **run)
    assert torch.equal(again.sequences, first.sequences)


def test_a_step_written_at_the_graph_position_is_the_eager_write():
    """Inside a CUDA-graph capture a decode step writes at ``write_position`` (a tensor the graph reads): the
    buffers it returns are those of the eager write after the filled positions."""
    g = torch.Generator().manual_seed(81)
    eager, graphed = AdaptiveCache(decoder_with(1), None), AdaptiveCache(decoder_with(1), None)
    prompt, step = ([torch.randn(2, 3, T, 4, generator=g) for _ in "kv"] for T in (13, 1))
    for cache in (eager, graphed):
        cache.reserve(14)
        cache.append(0, *prompt)
        cache.length = 13
    graphed.write_position = torch.tensor([13])
    for got, want in zip(graphed.append(0, *step), eager.append(0, *step)):
        assert torch.equal(got, want)
    assert torch.equal(eager.values[0][:, :, 13:14], step[1])


def _counted_layer_flops(model, **kwargs) -> list[int]:
    """Each decoder layer's matrix-product FLOPs (mm, addmm) as ``FlopCounterMode`` counts them in one forward (0
    for a layer not called); attention's, which the CPU's SDPA may or may not report, are left out."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**kwargs)
    counted = [0] * L
    for name, ops in counter.get_flop_counts().items():
        if match := re.search(r"language_model\.layers\.(\d+)$", name):
            counted[int(match[1])] = sum(n for op, n in ops.items() if op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    return counted


def _product_flops(config, heads: torch.Tensor, groups: torch.Tensor, tokens: int) -> int:
    """One layer's matrix-product FLOPs over ``tokens``, written out from the masks [H] and [G]: q and o per
    query head on, k and v per key/value head with a query head on, gate, up and down per neuron on (the
    first M % G groups one neuron larger). Attention's own products are left out."""
    D, d, H = config.hidden_size, config.head_dim, config.num_attention_heads
    M, kv_heads = config.intermediate_size, config.num_key_value_heads
    sizes = [M // H + (g < M % H) for g in range(H)]
    q = int(heads.sum())
    kv = sum(bool(heads[k * H // kv_heads:(k + 1) * H // kv_heads].any()) for k in range(kv_heads))
    neurons = sum(size for size, on in zip(sizes, groups.tolist()) if on)
    return 2 * tokens * D * (2 * d * q + 2 * d * kv + 3 * neurons)


def test_counted_flops_are_the_plans_products(stock):
    """FlopCounterMode sees, per decoder layer, exactly the products of the plan's active units: none for a
    skipped layer or one executed with nothing on, nothing for an inactive head, key/value head or neuron."""
    model, config = patched(stock, "H"), stock.config.text_config
    inputs = example_inputs(stock, batch_size=1, seed=10)
    tokens = inputs["input_ids"].shape[1]
    for seed in (5, 6):
        plan = random_plan(1, seed)
        want = [_product_flops(config, plan.heads[0, l], plan.groups[0, l], tokens) if plan.layers[0, l] else 0
                for l in range(L)]
        assert _counted_layer_flops(model, **inputs, execution_plan=plan) == want


@pytest.mark.parametrize("variant", ["L", "H"])
def test_plan_cost_is_the_share_of_flops_spent(stock, variant):
    """``cost()`` of ``ak.plan``'s plan: the counted products plus attention over all query-key pairs of the
    prompt and latency token, 4 * head_dim * tokens**2 per query head on, over the same for every unit on; the
    plan the request runs, its cache's, costs the same."""
    model, config = patched(stock, variant), stock.config.text_config
    inputs = example_inputs(stock, batch_size=1, seed=10)
    tokens = inputs["input_ids"].shape[1] + 1

    def attention_flops(heads):
        return 4 * config.head_dim * tokens ** 2 * int(heads.sum())

    full = sum(_counted_layer_flops(model, **inputs, latency_budget=1.0)) + L * attention_flops(torch.ones(H))
    for budget in (0.5, 0.6, 0.85):
        plan = ak.plan(model, latency_budget=budget, **inputs)
        spent = sum(_counted_layer_flops(model, **inputs, latency_budget=budget))
        spent += sum(attention_flops(plan.heads[0, l]) for l in range(L))
        assert float(plan.cost()[0]) == pytest.approx(spent / full, rel=1e-12), budget
        with torch.no_grad():
            ran = cache_of(model(**inputs, latency_budget=budget)).plan
        assert ran == plan and torch.equal(ran.cost(), plan.cost()), budget


def test_decode_bytes_are_the_cut_weights_and_the_compact_cache(stock):
    """DecoderShape.decode_bytes: the weights of a stock model cut to the plan (multi-head attention, where
    the cut keeps no whole groups), plus the keys and values the compact cache holds after a prefill
    (grouped-query attention)."""
    plan = random_plan(1, seed=9)
    masks = (plan.layers, plan.heads, plan.groups)
    mha = tiny_llava(seed=3, num_kv_heads=H)
    cut = sliced_stock(mha, plan, 0).model.language_model.layers
    weights = sum(p.numel() for p in cut.parameters()) * 4
    assert text_model_shape(mha).decode_bytes(*masks, cached=0, element_size=4).sum().item() == weights
    inputs = example_inputs(stock, batch_size=1, seed=12)
    with torch.no_grad():
        out = patched(stock, "H")(**inputs, execution_plan=plan, use_cache=True)
    cache = cache_of(out)
    held = sum(t.numel() for l in range(L) if cache.layer(l) is not None for t in cache.layer(l)) * 4
    shape, T = text_model_shape(stock), inputs["input_ids"].shape[1]
    kv = shape.decode_bytes(*masks, cached=T, element_size=4) - shape.decode_bytes(*masks, cached=0, element_size=4)
    assert held > 0 and kv.sum().item() == held


def test_unpatch_restores_stock_exactly_and_patch_is_per_instance(stock):
    inputs = example_inputs(stock, batch_size=2, seed=12, pad=[1, 0])
    model = copy.deepcopy(stock)
    other = copy.deepcopy(stock)
    with torch.no_grad():
        before = model(**inputs).logits
        ak.patch(model, "H", rank=2)
        assert ak.patch(model, "H", rank=2) is model
        assert "AdaptiveLlamaDecoderLayer" in repr(model) and "Adaptive" not in repr(other)
        assert torch.equal(other(**inputs).logits, before)
        model(**inputs, latency_budget=0.5)
        ak.unpatch(model)
        assert type(model) is type(stock) and "Adaptive" not in repr(model)
        assert not any("latency" in k for k in model.state_dict())
        assert torch.equal(model(**inputs).logits, before)
    assert torch.equal(greedy(model, inputs), greedy(stock, inputs))


def test_scheduler_weights_survive_save_and_load(stock, tmp_path):
    inputs = example_inputs(stock, batch_size=2, seed=13)
    model = patched(stock, "H")
    with torch.no_grad():
        for p in model.model.language_model.latency_scheduler.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "scheduler.safetensors"
    ak.save_scheduler(model, path)
    plans = ak.plan(model, latency_budget=[0.6, 0.75], **inputs)
    fresh = patched(stock, "H")
    assert ak.plan(fresh, latency_budget=[0.6, 0.75], **inputs) != plans
    loaded = patched(stock, "H", scheduler=path)
    assert ak.plan(loaded, latency_budget=[0.6, 0.75], **inputs) == plans
    torch.testing.assert_close(ak.latency_embedding(loaded, 0.6), ak.latency_embedding(model, 0.6))
    with pytest.raises(ValueError, match="scheduler"):
        patched(stock, "L", scheduler=path)
    with pytest.raises(ValueError, match=r"another setting \(rank: file 2 vs model 4\)"):  # same tensor shapes
        patched(stock, "H", rank=4, scheduler=path)
    with pytest.raises(ValueError, match=r"another setting \(num_prefix_layers: file 4 vs model 3\)"):
        patched(stock, "H", num_prefix_layers=3, scheduler=path)
    l_path = tmp_path / "l.safetensors"
    ak.save_scheduler(patched(stock, "L", rank=4), l_path)
    patched(stock, "L", rank=2, scheduler=l_path)  # L ignores rank, so its files fit any


@pytest.mark.triton
def test_save_pretrained_writes_the_stock_checkpoint_and_the_scheduler(stock, tmp_path):
    """A patched model saves what the stock one would (its class in config.json, every stock tensor, nothing
    else), whatever layout patching gave its weights, and its scheduler beside it for patch's scheduler=."""
    inputs = example_inputs(stock, batch_size=2, seed=15)
    model = patched(stock, "H", backend="triton")  # reduction weights laid out column-major
    with torch.no_grad():
        for p in model.model.language_model.latency_scheduler.parameters():
            p.add_(torch.randn_like(p))
    plans = ak.plan(model, latency_budget=[0.6, 0.75], **inputs)
    model.save_pretrained(tmp_path)
    assert type(model).__name__ == "AdaptiveLlavaForConditionalGeneration"
    assert model.config.architectures == ["LlavaForConditionalGeneration"]
    loaded, info = LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is type(stock) and loaded.config.architectures == ["LlavaForConditionalGeneration"]
    assert not any(info.values()), info
    want = stock.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    again = ak.patch(loaded, "H", rank=2, scheduler=tmp_path / SCHEDULER_FILE)
    assert ak.plan(again, latency_budget=[0.6, 0.75], **inputs) == plans
    given = {k: v + 1 if k.endswith("lm_head.weight") else v for k, v in want.items()}  # a state_dict the caller gives
    scheduler_keys = {k: v for k, v in model.state_dict().items() if ".latency_scheduler." in k}
    model.save_pretrained(tmp_path / "given", state_dict=given | scheduler_keys)  # as given, less the scheduler
    loaded, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "given", output_loading_info=True)
    assert scheduler_keys and not any(info.values()), info
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, given[name]), name


def test_a_save_to_a_files_path_does_what_stock_does(stock, tmp_path):
    """Stock's save_pretrained given a file's path logs that it should be a folder and returns; so does a patched
    model's, leaving the file and its folder as they were (no scheduler file beside it)."""
    path = tmp_path / "a file"
    for model in (copy.deepcopy(stock), patched(stock, "H")):
        path.write_text("kept")
        model.save_pretrained(path)
        assert path.read_text() == "kept" and [p.name for p in tmp_path.iterdir()] == ["a file"]


def test_a_save_leaves_the_model_serving_requests(stock, tmp_path, monkeypatch):
    """While save_pretrained writes (another thread's save, say), the model stays the patched one: a request
    made then is served, with the result it has at any other time."""
    model = patched(stock, "H")
    inputs = example_inputs(stock, batch_size=1, seed=18)
    with torch.no_grad():
        want = model(**inputs, latency_budget=0.6).logits
    served = []
    save_config = type(model.config).save_pretrained

    def save_config_and_serve(config, save_directory, **kwargs):  # called by stock's save_pretrained, mid-save
        save_config(config, save_directory, **kwargs)
        with torch.no_grad():
            served.append(model(**inputs, latency_budget=0.6).logits)

    monkeypatch.setattr(type(model.config), "save_pretrained", save_config_and_serve)
    model.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert len(served) == 1 and torch.equal(served[0], want)
    assert LlavaForConditionalGeneration.from_pretrained(tmp_path).config.architectures == [type(stock).__name__]


def test_save_pretrained_writes_where_stock_writes_and_uploads_the_scheduler_with_push_to_hub(stock, tmp_path,
                                                                                                   monkeypatch):
    """is_main_process=False writes nothing, as stock; save_pretrained(push_to_hub=True) would upload before the
    scheduler file is written, so it is refused, and push_to_hub (its hub calls stubbed here) uploads both."""
    import transformers.utils.hub as hub

    model = patched(stock, "H")
    stock.save_pretrained(tmp_path / "stock", is_main_process=False)
    model.save_pretrained(tmp_path / "patched", is_main_process=False)
    assert sorted((tmp_path / "patched").iterdir()) == sorted((tmp_path / "stock").iterdir()) == []
    with pytest.raises(ValueError, match="push_to_hub=True: .*model.push_to_hub"):
        model.save_pretrained(tmp_path / "pushed", push_to_hub=True, repo_id="me/model")
    assert not (tmp_path / "pushed").exists() or not any((tmp_path / "pushed").iterdir())

    class Hub:  # the hub calls push_to_hub makes, offline
        repo_id = None

        def create_repo(self, repo_id, **kwargs):
            self.repo_id = repo_id
            return self

        def save(self, path):  # the model card
            pass

    uploaded = {}

    def upload(self, folder, repo_id, files_timestamps, **kwargs):
        uploaded[repo_id] = sorted(p.name for p in Path(folder).iterdir())

    monkeypatch.setattr(hub, "hf_api", Hub)
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *args, **kwargs: Hub())
    monkeypatch.setattr(LlavaForConditionalGeneration, "_upload_modified_files", upload)
    model.push_to_hub("me/model")
    assert SCHEDULER_FILE in uploaded["me/model"] and "model.safetensors" in uploaded["me/model"], uploaded


@pytest.mark.parametrize("failing", ["scheduler file", "folder in the way", "stock's files"])
def test_save_pretrained_writes_the_checkpoint_and_its_scheduler_or_neither(stock, tmp_path, monkeypatch, failing):
    """save_pretrained wrote stock's files, then the scheduler: where that failed (a full disk, a folder of its
    name), the folder held new weights beside no scheduler or an earlier save's, which patch(scheduler=) then
    loaded. The scheduler is written first, under another name: where it cannot be, nothing is written (refused
    naming save_directory); where stock's files fail, the folder keeps its earlier scheduler and no partial one."""
    folder = tmp_path / "ckpt"
    model = patched(stock, "H")
    model.save_pretrained(folder)
    earlier = (folder / SCHEDULER_FILE).read_bytes()
    weights = sorted(p.name for p in folder.iterdir())
    with torch.no_grad():
        model.model.language_model.latency_scheduler.head.weight.add_(1)  # trained since
    for name in weights:
        (folder / name).unlink()
    if failing == "scheduler file":
        def full_disk(scheduler, path):
            raise ValueError(f"path={path} cannot be written as a file (no space left on device, planted)")
        monkeypatch.setattr(llava_module, "save_scheduler_weights", full_disk)
        refused = f"save_directory={folder}: {SCHEDULER_FILE} cannot be written there, so nothing was saved"
    elif failing == "folder in the way":
        (folder / SCHEDULER_FILE).mkdir()
        refused = f"save_directory={folder}: {SCHEDULER_FILE} cannot be written there, so nothing was saved"
    else:
        def full_disk(*args, **kwargs):
            raise OSError("no space left on device (planted)")
        monkeypatch.setattr(LlavaForConditionalGeneration, "save_pretrained", full_disk)
        (folder / SCHEDULER_FILE).write_bytes(earlier)
        refused = "planted"
    with pytest.raises((ValueError, OSError), match=re.escape(refused)):
        model.save_pretrained(folder)
    left = sorted(p.name for p in folder.iterdir())
    if failing == "stock's files":
        assert left == [SCHEDULER_FILE] and (folder / SCHEDULER_FILE).read_bytes() == earlier
    else:
        assert left == ([SCHEDULER_FILE] if failing == "folder in the way" else [])


def test_the_generated_classes_are_not_built_or_loaded_themselves(stock, tmp_path):
    """An Adaptive* class exists for instances patch made: built or loaded directly it made a half-patched model
    (stock parts under the patched class; loading gave lm_head random weights), so it refuses, by name."""
    model = patched(stock, "H")
    stock.save_pretrained(tmp_path)
    lm = model.model.language_model
    for build in (lambda: type(model).from_pretrained(tmp_path), lambda: type(model)(stock.config),
                  lambda: type(lm)(stock.config.text_config), lambda: type(lm.layers[0])(stock.config.text_config, 0)):
        with pytest.raises(TypeError, match="made by adaptive_kernels.patch, not built or loaded itself"):
            build()


def test_patched_models_pickle_in_this_process_and_a_fresh_one(stock, tmp_path):
    """torch.save / pickle of a patched model: its generated classes are made again where they are missing.
    Stock's limits hold: a model that has run is not picklable (transformers 5.2x's hooks, local functions), and
    in a fresh process its vision tower returns no hidden states, so that process runs text only."""
    inputs = example_inputs(stock, batch_size=1, seed=16)
    model = ak.patch(tiny_llava(seed=1), "H", rank=2)
    torch.save(model, tmp_path / "model.pt")
    copied = pickle.loads(pickle.dumps(model))
    want = greedy(model, inputs, latency_budget=0.6)
    assert type(copied) is type(model) and torch.equal(greedy(copied, inputs, latency_budget=0.6), want)
    ids = torch.randint(0, stock.config.image_token_id, (2, 7), generator=torch.Generator().manual_seed(17))
    torch.save(ids, tmp_path / "ids.pt")
    script = ("import sys, torch; d = sys.argv[1]; m = torch.load(d + '/model.pt', weights_only=False)\n"
              "with torch.no_grad(): torch.save(m(input_ids=torch.load(d + '/ids.pt'), latency_budget=0.6).logits, d + '/out.pt')\n"
              "print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["AdaptiveLlavaForConditionalGeneration"]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), model(input_ids=ids, latency_budget=0.6).logits)


def test_repatching_keeps_the_scheduler_of_the_same_units(stock):
    """patch again with other settings but the same variant, rank and prefix: the (trained) scheduler stays."""
    inputs = example_inputs(stock, batch_size=2, seed=43)
    model = patched(stock, "H")
    with torch.no_grad():
        for p in model.model.language_model.latency_scheduler.parameters():
            p.add_(torch.randn_like(p))
    budgets = [0.6, 0.75]
    trained = ak.plan(model, latency_budget=budgets, **inputs)
    embedding = ak.latency_embedding(model, 0.6)
    assert ak.plan(patched(stock, "H"), latency_budget=budgets, **inputs) != trained
    ak.patch(model, "H", rank=2, cuda_graphs=False)
    assert model.model.language_model._ak_settings.cuda_graphs is False  # the other setting holds
    assert ak.plan(model, latency_budget=budgets, **inputs) == trained
    assert torch.equal(ak.latency_embedding(model, 0.6), embedding)
    ak.patch(model, "H", rank=4)  # other units: a fresh, seeded scheduler
    assert torch.equal(ak.latency_embedding(model, 0.6), ak.latency_embedding(patched(stock, "H", rank=4), 0.6))


def test_the_scheduler_takes_the_models_mode(stock):
    for mode in (False, True):
        model = patched(copy.deepcopy(stock).train(mode), "H")
        assert {m.training for m in model.modules()} == {mode}


@pytest.mark.parametrize("variant,prefix", [("L", None), ("H", None), ("L", 1), ("H", 0), ("H", 6), ("L", 5)])
def test_the_scheduler_reads_the_latency_tokens_state_after_the_prefix(stock, variant, prefix):
    """ak.plan is the scheduler's top-n over the latency token's hidden state after the prefix's last layer
    (the last position, layer P-1's output; with no prefix its input embedding), as a stock model fed the prompt
    then the latency token computes it; per row, a left-padded one included, for the default prefix (half the
    layers) and others. (The other tests take ak.plan's plan as given.)"""
    budgets = [0.6, 0.8, 0.95]
    inputs = example_inputs(stock, batch_size=3, seed=83, pad=[0, 3, 0])
    model = patched(stock, variant, **({} if prefix is None else {"num_prefix_layers": prefix}))
    P = L // 2 if prefix is None else prefix
    with torch.no_grad():
        plan = ak.plan(model, latency_budget=budgets, **inputs)
        embeds, mask = fed_latency_token(model, stock, inputs, budgets)
        states = stock.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                            output_hidden_states=True).hidden_states
        layers, heads, groups = model.model.language_model.latency_scheduler.select(states[P][:, -1], budgets)
    assert plan.layers[:, :P].all() and plan.heads[:, :P].all() and plan.groups[:, :P].all()
    assert torch.equal(plan.layers[:, P:], layers)
    assert torch.equal(plan.heads[:, P:], heads)
    assert torch.equal(plan.groups[:, P:], groups)


def test_fresh_schedulers_are_seeded(stock):
    inputs = example_inputs(stock, batch_size=1, seed=14)
    torch.manual_seed(123)
    a = ak.plan(patched(stock, "H"), latency_budget=0.7, **inputs)
    torch.manual_seed(456)
    b = ak.plan(patched(stock, "H"), latency_budget=0.7, **inputs)
    assert a == b


@pytest.mark.triton
def test_patch_stacks_qkv_weights_and_unpatch_separates_them(stock):
    """For the Triton backend (one gathered product over q, k and v); the torch backend keeps stock's tensors."""
    model = copy.deepcopy(stock)
    where = {name: p.data_ptr() for name, p in model.named_parameters()}
    ak.patch(model, "H", rank=2)
    with torch.no_grad():
        assert all(stacked_qkv(layer.self_attn) is None for layer in model.model.language_model.layers)
    assert {name: p.data_ptr() for name, p in ak.unpatch(model).named_parameters()} == where
    model = patched(stock, "H", backend="triton")
    for layer, original in zip(model.model.language_model.layers, stock.model.language_model.layers):
        with torch.no_grad():
            weight, _ = stacked_qkv(layer.self_attn)
        a = original.self_attn
        torch.testing.assert_close(weight, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), rtol=0, atol=0)
        assert stacked_qkv(layer.self_attn) is None  # autograd on: the separate weights
    ak.unpatch(model)
    for layer in model.model.language_model.layers:
        weights = [lin.weight for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)]
        assert len({w.untyped_storage().data_ptr() for w in weights}) == 3
        assert all(w.storage_offset() == 0 and w.is_contiguous() for w in weights)


def test_qkv_weights_copied_apart_after_patch_still_give_the_masked_computation(stock):
    """A weight replaced after patching (here k of layer 2) ends the stacking of its layer; that layer
    projects q, k and v separately and the result stays the masked computation."""
    inputs = example_inputs(stock, batch_size=2, seed=13, pad=[0, 1])
    plan = random_plan(2, seed=14)
    model = patched(stock, "H")
    attn = model.model.language_model.layers[2].self_attn
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach().clone())
    with torch.no_grad():
        assert stacked_qkv(attn) is None
        torch.testing.assert_close(model(**inputs, execution_plan=plan).logits,
                                   masked_stock(stock, plan)(**inputs).logits, **TOL)


def test_qkv_weights_sharing_one_storage_out_of_order_give_the_masked_computation(stock):
    """q, k and v weights re-pointed after patching to views of one storage, but not back to back in that order
    (here q, v, k, as a fused checkpoint in another order or a state dict loaded with assign=True leaves them):
    the layer is not stacked, and the result stays the masked computation (a stacked read would take v for k)."""
    inputs = example_inputs(stock, batch_size=2, seed=15, pad=[0, 2])
    plan = random_plan(2, seed=16)
    plan.layers[:, 2] = True
    plan.heads[:, 2], plan.groups[:, 2] = torch.arange(H) % 3 != 1, True
    model = patched(stock, "H")
    attn = model.model.language_model.layers[2].self_attn
    q, k, v = (lin.weight.detach() for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
    whole = torch.cat([q, v, k])
    nq, nkv = q.shape[0], k.shape[0]
    attn.q_proj.weight.data, attn.v_proj.weight.data, attn.k_proj.weight.data = whole.split([nq, nkv, nkv])
    with torch.no_grad():
        assert stacked_qkv(attn) is None
        torch.testing.assert_close(model(**inputs, execution_plan=plan).logits,
                                   masked_stock(stock, plan)(**inputs).logits, **TOL)


def test_every_positional_slot_of_stock_forward_can_be_filled_by_position():
    """A call giving each of stock forward's positional parameters by position (its defaults where the inputs
    have none) is taken, as stock takes it, and gives the loss of the same call by name."""
    model = ak.patch(tiny_llava(seed=41), "H", rank=2)
    inputs = example_inputs(model, batch_size=2, seed=42, pad=[0, 1])
    values = inputs | {"labels": inputs["input_ids"]}
    slots = [p for p in list(inspect.signature(LlavaForConditionalGeneration.forward).parameters.values())[1:]
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    positional = [values.get(p.name, p.default) for p in slots]
    with torch.no_grad():
        by_name = model(**values, latency_budget=[0.6, 0.8]).loss
        assert torch.equal(model(*positional, latency_budget=[0.6, 0.8]).loss, by_name)


def test_layers_past_the_configs_count_at_patch_time_run_nowhere_as_in_stock():
    """Stock runs the config's num_hidden_layers layers and ignores more; a model that has more when patched is
    taken, and every unit on gives stock's logits."""
    stock = tiny_llava(seed=48)
    stock.model.language_model.layers.append(copy.deepcopy(stock.model.language_model.layers[0]))
    inputs = example_inputs(stock, batch_size=2, seed=49, pad=[0, 2])
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[real], stock(**inputs).logits[real], rtol=1e-5, atol=2e-6)


def test_an_executed_layer_without_heads_or_groups_adds_its_output_biases():
    """Invariant 1: a skipped head's output is zeroed before o_proj, a skipped neuron's before down_proj, so a layer
    that runs with no head (no group) on still adds o_proj's (down_proj's) bias: the masked computation, on a
    model with random projection biases, every logit of both rows (one left-padded)."""
    stock = stock_of_shape(52, num_heads=4, num_kv_heads=2, hidden_size=40, head_dim=12, attention_bias=True,
                           mlp_bias=True)
    inputs = example_inputs(stock, batch_size=2, seed=53, pad=[0, 2])
    g = torch.Generator().manual_seed(54)
    layers = torch.ones(2, 4, dtype=torch.bool)
    heads, groups = torch.rand(2, 4, 4, generator=g) < 0.6, torch.rand(2, 4, 4, generator=g) < 0.6
    heads[:, 1], groups[:, 2] = False, False  # layer 1 runs with no head on, layer 2 with no group
    heads[0, 3], groups[1, 3] = True, False
    plan = ExecutionPlan(layers, heads, groups)
    model = ak.patch(copy.deepcopy(stock), "H", rank=1)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, execution_plan=plan).logits,
                                   masked_stock(stock, plan)(**inputs).logits, rtol=1e-5, atol=2e-6)


def test_an_mlp_activation_other_than_silu_runs_as_that_activation():
    """Only SiLU runs as the fused SwiGLU: a decoder whose MLPs use GELU computes act(gate) * up with GELU, under a
    full plan as stock and under a random plan as the masked computation."""
    stock = tiny_llava(seed=55)
    for layer in stock.model.language_model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    inputs = example_inputs(stock, batch_size=2, seed=56, pad=[1, 0])
    g = torch.Generator().manual_seed(57)
    layers = torch.rand(2, L, generator=g) < 0.8
    plan = ExecutionPlan(layers, (torch.rand(2, L, H, generator=g) < 0.6) & layers[..., None],
                         (torch.rand(2, L, H, generator=g) < 0.6) & layers[..., None])
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[real], stock(**inputs).logits[real], rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(model(**inputs, execution_plan=plan).logits,
                                   masked_stock(stock, plan)(**inputs).logits, rtol=1e-5, atol=2e-6)


def test_a_head_dim_other_than_hidden_over_heads_is_the_configs():
    """A text config's explicit head_dim (12 for 4 heads of a hidden size of 40) sizes the heads: the model is
    patched, and every unit on gives stock's logits."""
    stock = stock_of_shape(58, num_heads=4, num_kv_heads=2, hidden_size=40, head_dim=12)
    inputs = example_inputs(stock, batch_size=2, seed=59, pad=[0, 3])
    model = ak.patch(copy.deepcopy(stock), "H", rank=1)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[real], stock(**inputs).logits[real], rtol=1e-5, atol=2e-6)
