"""Requests inside CUDA-graph capture: the scheduler, the plan's fixed-width index buffers, prefill and
decode read nothing back to the host, and give what the usual path gives.

The package takes that path while the model's stream is capturing, and within ``ak.graph_safe()`` (where
a request is warmed up before its capture). On the CPU these tests take it there, compare it with the
masked computation and with the usual path, and run it on the meta device, where any read of a value
raises. On a GPU one graph holds a whole request.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import adaptive_kernels as ak
from adaptive_kernels import ExecutionPlan
from adaptive_kernels.graphs import runs_graph_safe
from adaptive_kernels.plan import DecoderShape, dense_layer
from adaptive_kernels.sliced import masked_stock
from adaptive_kernels.tiny import example_inputs, tiny_llava
from test_backends import interpreter
from oracles import (CACHE_KWARG, CpuGraph, cache_of, cpu_decode_graphs, fed_latency_token, replaying_decode_steps,
                     stock_of_shape)

CUDA = torch.cuda.is_available()
BACKENDS = ["torch", pytest.param("triton", marks=interpreter)]
TOL = dict(rtol=2e-4, atol=2e-4)


def plan_with_skips(batch: int, layers: int, heads: int, seed: int) -> ExecutionPlan:
    """Random masks with a skipped layer in every row and an executed layer with nothing on."""
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(batch, layers, generator=g) < 0.7
    on[:, 1], on[:, 2] = False, True
    h = (torch.rand(batch, layers, heads, generator=g) < 0.5) & on[..., None]
    gr = (torch.rand(batch, layers, heads, generator=g) < 0.5) & on[..., None]
    h[:, 2], gr[:, 2] = False, False
    return ExecutionPlan(on, h, gr)


SCORED = dict(output_logits=True, return_dict_in_generate=True)  # greedy's ids with every step's logits


def greedy(model, inputs, **request):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None, **request)


def assert_same_decode(ours, reference):
    """Two ``greedy(..., **SCORED)`` outputs give the same new ids, and each step's logits agree."""
    steps = len(reference.logits)
    assert torch.equal(ours.sequences[:, -steps:], reference.sequences[:, -steps:])
    for step, (got, expected) in enumerate(zip(ours.logits, reference.logits, strict=True)):
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"decode step {step}: {m}")


def whole_request(model, embeds, mask):
    """A request that reads nothing back: a prefill of ``embeds`` [2, S, D] (padding ``mask``) at budgets 0.6 and
    0.9, then three greedy decode steps; ``(plan, logits of each call)``."""
    embed = model.model.language_model.embed_tokens
    out = model(inputs_embeds=embeds, attention_mask=mask, latency_budget=[0.6, 0.9])
    logits, cache, seen = [out.logits], cache_of(out), mask
    for _ in range(3):
        token = logits[-1][:, -1].argmax(-1, keepdim=True)
        seen = torch.cat([seen, seen[:, :1]], dim=1)
        logits.append(model(inputs_embeds=embed(token), attention_mask=seen, **{CACHE_KWARG: cache}).logits)
    return cache.plan, logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("biases", [False, True], ids=["no-bias", "biased"])
def test_a_plan_on_fixed_width_buffers_is_the_masked_computation(backend, biases):
    """Every layer runs at full width on every row, padded entries reading nothing; a row's skipped layer
    (all units off) leaves it unchanged, projection biases included. Its decode steps give the masked
    computation's logits and ids."""
    stock = stock_of_shape(71, num_heads=4, num_kv_heads=2, hidden_size=40, head_dim=12, attention_bias=biases,
                           mlp_bias=biases)
    inputs = example_inputs(stock, batch_size=2, seed=72, pad=[0, 3])
    plan = plan_with_skips(2, 4, 4, seed=73)
    model = ak.patch(copy.deepcopy(stock), "H", rank=1, backend=backend)
    with torch.no_grad(), ak.graph_safe():
        ours = model(**inputs, execution_plan=plan)
        ours_decode = greedy(model, inputs, execution_plan=plan, **SCORED)
    reference = masked_stock(stock, plan)
    masked_decode = greedy(reference, inputs, **SCORED)
    with torch.no_grad():
        masked = reference(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours.logits[valid], masked[valid], **TOL)
    assert ours.logits[~valid].isfinite().all()
    assert_same_decode(ours_decode, masked_decode)


def test_inside_graph_safe_a_skipped_layers_units_count_as_off():
    """Where masks cannot be read back to be checked, a plan edited in place so that a skipped layer has heads
    and groups on runs that layer skipped: the masked computation of the plan before the edit."""
    stock = stock_of_shape(74, num_heads=4, num_kv_heads=2, hidden_size=40, head_dim=12)
    inputs = example_inputs(stock, batch_size=2, seed=75, pad=[2, 0])
    plan = plan_with_skips(2, 4, 4, seed=76)  # layer 1 skipped on every row
    valid = ExecutionPlan(plan.layers.clone(), plan.heads.clone(), plan.groups.clone())
    plan.heads[:, 1], plan.groups[:, 1] = True, True
    model = ak.patch(copy.deepcopy(stock), "H", rank=1)
    with torch.no_grad(), ak.graph_safe():
        ours = model(**inputs, execution_plan=plan).logits
        masked = masked_stock(stock, valid)(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[real], masked[real], **TOL)


def test_a_plan_edited_in_place_after_a_graph_safe_prefill_changes_nothing_of_that_request():
    """As on the usual path, the cache keeps a copy of the plan its prefill ran, its layers mask included: the
    caller's later edits of the masks change neither that plan nor what a continuation is compared with."""
    stock = tiny_llava(seed=77, num_layers=4)
    inputs = example_inputs(stock, batch_size=2, seed=78)
    plan = plan_with_skips(2, 4, 8, seed=79)
    original = ExecutionPlan(plan.layers.clone(), plan.heads.clone(), plan.groups.clone())
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch")
    with torch.no_grad(), ak.graph_safe():
        out = model(**inputs, execution_plan=plan)
    plan.layers[:], plan.heads[:], plan.groups[:] = ~plan.layers, ~plan.heads, ~plan.groups
    assert cache_of(out).plan == original and cache_of(out).plan != plan


def test_a_decode_step_given_another_plan_of_the_same_shape_inside_graph_safe_runs_the_caches():
    """Inside graph_safe, where the masks may not be read back to compare them, a step continuing a cache and given
    another plan of the same shape runs as the cache's plan (README): the step given no plan, not a refusal."""
    model = ak.patch(tiny_llava(seed=80, num_layers=4), "H", rank=2, backend="torch")
    inputs = example_inputs(model, seed=81)
    prefill_plan, other = plan_with_skips(1, 4, 8, seed=82), plan_with_skips(1, 4, 8, seed=83)
    assert other != prefill_plan
    with torch.no_grad(), ak.graph_safe():
        out = model(**inputs, execution_plan=prefill_plan)
        token = out.logits[:, -1:].argmax(-1)
        want = model(input_ids=token, **{CACHE_KWARG: copy.deepcopy(cache_of(out))}).logits
        got = model(input_ids=token, execution_plan=other, **{CACHE_KWARG: cache_of(out)}).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("variant", ["L", "H"])
def test_a_budget_inside_capture_picks_the_usual_plan_and_output(variant):
    """The scheduler's top-n and the plan's buffers on the device give the plan, logits and ids of the
    usual path (host index lists), per-row budgets included, and the logits of the masked computation of that
    plan fed the latency token. (The torch backend: the Triton kernels on fixed-width buffers are checked
    above.)"""
    stock = tiny_llava(seed=74, num_layers=6)
    inputs = example_inputs(stock, batch_size=3, seed=75, pad=[2, 0, 0])
    budgets = [0.5, 0.75, 1.0]
    model = ak.patch(copy.deepcopy(stock), variant, rank=2, backend="torch")
    with torch.no_grad():
        usual = model(**inputs, latency_budget=budgets)
    usual_ids = greedy(model, inputs, latency_budget=budgets)
    with torch.no_grad(), ak.graph_safe():
        ours = model(**inputs, latency_budget=budgets)
        ours_decode = greedy(model, inputs, latency_budget=budgets, **SCORED)
        embeds, mask = fed_latency_token(model, stock, inputs, budgets)
    reference = masked_stock(stock, cache_of(usual).plan)
    with torch.no_grad():
        masked = reference(inputs_embeds=embeds, attention_mask=mask).logits
    masked_decode = greedy(reference, dict(inputs_embeds=embeds, attention_mask=mask), **SCORED)
    assert cache_of(ours).plan == cache_of(usual).plan
    valid = mask.bool()
    torch.testing.assert_close(ours.logits[valid], usual.logits[valid], **TOL)
    torch.testing.assert_close(ours.logits[valid], masked[valid], **TOL)
    assert torch.equal(ours_decode.sequences, usual_ids)
    assert_same_decode(ours_decode, masked_decode)


def test_graph_safe_blocks_nest():
    """Leaving a graph_safe() block restores what held before it: inside an outer block a request still reads
    nothing back after an inner block ends; after the outer one it runs as usual."""
    x = torch.zeros(1)
    assert not runs_graph_safe(x)
    with ak.graph_safe():
        with ak.graph_safe():
            assert runs_graph_safe(x)
        assert runs_graph_safe(x)
    assert not runs_graph_safe(x)


def test_graph_safe_ends_with_its_block_when_the_block_raises():
    """An exception leaving a graph_safe() block (an inner one inside an outer, then the outer) restores what
    held before that block, as leaving it normally does."""
    x = torch.zeros(1)
    with ak.graph_safe():
        with pytest.raises(RuntimeError, match="inner"), ak.graph_safe():
            raise RuntimeError("inner")
        assert runs_graph_safe(x)
    with pytest.raises(RuntimeError, match="outer"), ak.graph_safe():
        raise RuntimeError("outer")
    assert not runs_graph_safe(x)


@pytest.mark.parametrize("given", ["budget", "plan"])
def test_a_request_inside_capture_reads_no_value_back(given):
    """On the meta device tensors have shapes but no values: copying one to the host, or reading one,
    raises. A budget's prefill (scheduler, plan, every layer), or a given plan's, and a decode step run there."""
    stock = tiny_llava(seed=76, num_layers=4)
    inputs = example_inputs(stock, batch_size=2, seed=77)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch").to("meta")
    embed = model.model.language_model.embed_tokens
    mask = inputs["attention_mask"].to("meta")
    request = {"latency_budget": 0.6} if given == "budget" else {"execution_plan": plan_with_skips(2, 4, 8, 78).to("meta")}
    with torch.no_grad(), ak.graph_safe():
        out = model(inputs_embeds=embed(inputs["input_ids"].to("meta")), attention_mask=mask, **request)
        # the request given again, as generate gives it at every step: checked against the cache's without a read
        step = model(inputs_embeds=embed(torch.zeros(2, 1, dtype=torch.long, device="meta")),
                     attention_mask=torch.cat([mask, mask[:, :1]], dim=1), **{CACHE_KWARG: cache_of(out)}, **request)
    assert cache_of(out).plan.layers.device.type == "meta"
    assert step.logits.shape == (2, 1, stock.config.text_config.vocab_size)


def test_the_usual_request_reads_values_back():
    """The counterpart: outside capture the plan's index lists are built on the host, which needs the masks'
    values, so on the meta device the request fails (the test above can fail)."""
    stock = tiny_llava(seed=76, num_layers=4)
    inputs = example_inputs(stock, batch_size=2, seed=77)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch").to("meta")
    embed = model.model.language_model.embed_tokens
    with torch.no_grad(), pytest.raises(NotImplementedError, match="meta"):
        model(inputs_embeds=embed(inputs["input_ids"].to("meta")), attention_mask=inputs["attention_mask"].to("meta"),
              latency_budget=0.6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_a_whole_request_is_one_cuda_graph(backend):
    """Prefill at a budget (scheduler, plan compaction, every layer) and three greedy decode steps, captured
    as one CUDA graph and replayed on another prompt of the same length: that prompt's plan, logits and
    tokens as an eager request gives them."""
    stock = tiny_llava(seed=78, num_layers=6).cuda()
    first, second = (example_inputs(stock, batch_size=2, seed=seed) for seed in (79, 81))  # other plans
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend=backend)
    embed = model.model.language_model.embed_tokens
    mask = first["attention_mask"]
    prompt = embed(first["input_ids"]).detach().clone()

    def request(embeds):
        return whole_request(model, embeds, mask)

    with torch.no_grad():
        with ak.graph_safe():
            first_plan, _ = request(prompt)  # compiles and tunes the kernels at the fixed widths, fills the memo
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            plan, logits = request(prompt)
        prompt.copy_(embed(second["input_ids"]))
        graph.replay()
        want_plan, want_logits = request(prompt.clone())
    assert plan == want_plan != first_plan
    for got, want in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def continued_greedy(model, out, steps: int) -> tuple:
    """``steps`` eager greedy decode steps (batch 1, no mask) continuing the cache of a prefill's output ``out``:
    ``(plan, last-position logits of the prefill and of each step)``."""
    embed = model.model.language_model.embed_tokens
    logits, cache = [out.logits[:, -1]], cache_of(out)
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        logits.append(model(inputs_embeds=embed(token), **{CACHE_KWARG: cache}).logits[:, -1])
    return cache.plan, torch.stack(logits)


def check_replays_continued(model, graph, static, out, prompts: list, steps: int, tolerance: dict) -> None:
    """Replays ``graph``, a captured prefill at budget 0.6 of ``static`` (its output ``out``), for the first of two
    ``prompts``, the second, then the first again, each replay continued by ``continued_greedy``; asserts each gives
    the plan and logits (within ``tolerance``) of an eager request of that prompt on the same fixed-width path, and
    that the two prompts' plans differ."""
    plans = []
    for prompt in (prompts[0], prompts[1], prompts[0]):
        static.copy_(prompt)
        graph.replay()
        plan, logits = continued_greedy(model, out, steps)
        with ak.graph_safe():
            want_plan, want_logits = continued_greedy(model, model(inputs_embeds=prompt.clone(), latency_budget=0.6),
                                                      steps)
        assert plan == want_plan
        torch.testing.assert_close(logits, want_logits, **tolerance)
        plans.append(copy.deepcopy(plan))
    assert plans[0] == plans[2] != plans[1]  # the prompts' plans differ


@pytest.mark.parametrize("steps", [3, 12], ids=["within-capacity", "past-capacity"])
def test_a_cache_made_in_a_capture_continues_each_replays_prompt(steps, monkeypatch):
    """A captured prefill, replayed for one prompt after another, each replay continued eagerly: every replay
    rewrites the cache from its first position, and the steps after it continue that replay's prompt (its plan,
    its keys and values, its length), as an eager request of that prompt does; also where the steps before moved
    the cache to larger buffers than the graph writes (capacity step 8 here)."""
    monkeypatch.setattr(importlib.import_module("adaptive_kernels.cache"), "CAPACITY_STEP", 8)
    stock = tiny_llava(seed=81, num_layers=6)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch")
    embed = model.model.language_model.embed_tokens
    prompts = [embed(example_inputs(stock, batch_size=1, seed=seed)["input_ids"]).detach() for seed in (82, 86)]

    with torch.no_grad():
        static = prompts[0].clone()
        graph = CpuGraph(monkeypatch)
        with graph.capture():
            out = model(inputs_embeds=static, latency_budget=0.6)
        check_replays_continued(model, graph, static, out, prompts, steps, {})


def test_a_cache_continued_in_a_second_capture_goes_on_from_the_graph_replayed_last(monkeypatch):
    """A prefill at a budget captured in one graph and a decode step continuing its cache in another: eager steps
    after replaying both continue the step, and after replaying the prefill's graph alone continue the prompt, as
    eager requests of the replayed prompt do (whose plans differ, asserted)."""
    stock = tiny_llava(seed=81, num_layers=6)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch")
    embed = model.model.language_model.embed_tokens
    prompts = [embed(example_inputs(stock, batch_size=1, seed=seed)["input_ids"]).detach() for seed in (82, 86)]
    token = embed(torch.tensor([[5]])).detach()

    def stepped(out):
        return model(inputs_embeds=token, **{CACHE_KWARG: cache_of(out)})

    with torch.no_grad():
        static = prompts[0].clone()
        prefill, step = CpuGraph(monkeypatch), CpuGraph(monkeypatch)
        with prefill.capture():
            out = model(inputs_embeds=static, latency_budget=0.6)
        with step.capture():
            out_of_step = stepped(out)
        plans = []
        for prompt, with_step in ((prompts[1], True), (prompts[0], False), (prompts[1], False), (prompts[0], True)):
            static.copy_(prompt)
            prefill.replay()
            if with_step:
                step.replay()
            plan, logits = continued_greedy(model, out_of_step if with_step else out, 3)
            with ak.graph_safe():
                want = model(inputs_embeds=prompt.clone(), latency_budget=0.6)
                want_plan, want_logits = continued_greedy(model, stepped(want) if with_step else want, 3)
            assert plan == want_plan
            torch.testing.assert_close(logits, want_logits)
            plans.append(copy.deepcopy(plan))
        assert plans[0] == plans[2] != plans[1] == plans[3]


def test_a_cache_made_in_a_capture_counts_the_positions_of_the_call_replayed_last(monkeypatch):
    """After eager steps on a captured prefill's cache, a replay of the prefill for another prompt takes the cache
    back to that prefill: ``get_seq_length()`` counts its positions (not the earlier steps'), and generate, which
    slices the ids it is given by that count, continues the replayed prompt as it continues an eager request's."""
    stock = tiny_llava(seed=81, num_layers=6)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch")
    embed = model.model.language_model.embed_tokens
    prompts = [example_inputs(stock, batch_size=1, seed=seed)["input_ids"] for seed in (82, 86)]
    step = embed(prompts[0][:, -1:]).detach()

    def continued(out, ids):
        """Four greedy tokens generate adds to ``ids`` (the prompt and the first token), continuing ``out``'s cache."""
        ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), latency_budget=0.6,
                              max_new_tokens=4, do_sample=False, eos_token_id=None,
                              **{CACHE_KWARG: cache_of(out)})[:, ids.shape[1]:]

    with torch.no_grad():
        static = embed(prompts[0]).detach().clone()
        graph = CpuGraph(monkeypatch)
        with graph.capture():
            out = model(inputs_embeds=static, latency_budget=0.6)
        for _ in range(3):
            model(inputs_embeds=step, **{CACHE_KWARG: cache_of(out)})
        static.copy_(embed(prompts[1]))
        graph.replay()
        with ak.graph_safe():
            want = model(inputs_embeds=embed(prompts[1]), latency_budget=0.6)
        assert cache_of(out).get_seq_length() == cache_of(want).get_seq_length() == prompts[1].shape[1] + 1
        assert torch.equal(continued(out, prompts[1]), continued(want, prompts[1]))


def test_an_eager_step_after_replays_drops_a_decode_graph_of_other_buffers(monkeypatch):
    """Two captured calls can leave caches of one capacity in different buffers: a prefill's graph (capacity 8
    here), then decode steps' past it (16). A request that replays the prefill's alone and decodes past 8 moves the
    cache to new buffers, on which the model captures its decode graph; replaying both graphs then takes the cache
    back to the steps' buffers, and the eager steps after it run on those, not on the decode graph of the others:
    each step's logits are an eager request's."""
    monkeypatch.setattr(importlib.import_module("adaptive_kernels.cache"), "CAPACITY_STEP", 8)
    cpu_decode_graphs(monkeypatch)
    stock = tiny_llava(seed=81, num_layers=4)
    model = replaying_decode_steps(ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch"))
    embed = model.model.language_model.embed_tokens
    prompts = [embed(torch.randint(1, 400, (1, 6), generator=torch.Generator().manual_seed(seed))).detach()
               for seed in (82, 86)]

    def decoded(out, steps: int):
        """The output of ``steps`` greedy decode steps continuing ``out``'s cache."""
        for _ in range(steps):
            out = model(inputs_embeds=embed(out.logits[:, -1:].argmax(-1)), **{CACHE_KWARG: cache_of(out)})
        return out

    with torch.no_grad():
        static = prompts[0].clone()
        prefill, steps = CpuGraph(monkeypatch), CpuGraph(monkeypatch)
        with prefill.capture():
            out = model(inputs_embeds=static, latency_budget=0.6)  # 7 positions: capacity 8
        with steps.capture():
            last = decoded(out, 3)  # 10 positions: capacity 16
        static.copy_(prompts[1])
        prefill.replay()
        continued_greedy(model, out, 6)  # past 8 on buffers of its own, a decode graph captured on them
        assert cache_of(out).decode_graph is not None
        static.copy_(prompts[0])
        prefill.replay()
        steps.replay()
        _, logits = continued_greedy(model, last, 4)
        monkeypatch.undo()
        with ak.graph_safe():
            _, want = continued_greedy(model, decoded(model(inputs_embeds=prompts[0].clone(), latency_budget=0.6),
                                                      3), 4)
    torch.testing.assert_close(logits, want)


def test_a_whole_request_captured_replays_another_prompt_on_the_cpu(monkeypatch):
    """The GPU test of a whole request as one graph, on the CPU's stand-in for a CUDA graph: a budget's prefill
    (per-row budgets, a padded row) and three greedy decode steps captured, with nothing read back, and replayed
    on another prompt of the same length give that prompt's plan and logits as an eager request does."""
    stock = tiny_llava(seed=91, num_layers=6)
    first, second = (example_inputs(stock, batch_size=2, seed=seed, pad=[0, 2]) for seed in (92, 96))  # other plans
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch")
    embed = model.model.language_model.embed_tokens
    mask = first["attention_mask"]

    def request(embeds):
        return whole_request(model, embeds, mask)

    with torch.no_grad():
        prompt = embed(first["input_ids"]).detach().clone()
        graph = CpuGraph(monkeypatch)
        with graph.capture():
            plan, logits = request(prompt)
        captured_plan, captured = copy.deepcopy(plan), [l.clone() for l in logits]  # the first prompt's
        prompt.copy_(embed(second["input_ids"]))
        graph.replay()
        with ak.graph_safe():
            want_plan, want_logits = request(prompt.clone())
    assert plan == want_plan != captured_plan
    for got, want, before in zip(logits, want_logits, captured, strict=True):
        torch.testing.assert_close(got, want)
        assert not torch.allclose(before, want)  # the replay changed them


@pytest.mark.parametrize("eager_before", ["prefill", "a step after the capture", "a step, then a replay"])
def test_a_cache_that_an_eager_call_wrote_last_is_not_continued_inside_a_capture(monkeypatch, eager_before):
    """A decode step captured on a cache an eager call wrote last would, at each replay, write the position it was
    captured at, after positions only that eager call wrote (an eager prefill's; or an eager step's after a
    captured prefill, where Python counts the step's position even when the prefill's graph replayed since):
    refused, naming the cache."""
    stock = tiny_llava(seed=84, num_layers=4)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch")
    inputs = example_inputs(stock, batch_size=1, seed=85)
    embed = model.model.language_model.embed_tokens
    step = embed(inputs["input_ids"][:, -1:]).detach()
    with torch.no_grad():
        if eager_before == "prefill":
            cache = cache_of(model(**inputs, latency_budget=0.6))
        else:
            prefill = CpuGraph(monkeypatch)
            with prefill.capture():
                cache = cache_of(model(inputs_embeds=embed(inputs["input_ids"]), latency_budget=0.6))
            model(inputs_embeds=step, **{CACHE_KWARG: cache})
            if eager_before == "a step, then a replay":
                prefill.replay()
        with pytest.raises(ValueError, match=f"{CACHE_KWARG}: a cache that an eager call wrote last"):
            with CpuGraph(monkeypatch).capture():
                model(inputs_embeds=step, **{CACHE_KWARG: cache})


def test_a_budget_tensor_off_the_cpu_is_refused_where_nothing_may_be_read_back():
    """Within graph_safe() (or a capture) a budget tensor on a device would be read back to plan, or to compare
    with the budget of the request a call continues: refused, naming the argument and what is accepted. (The meta
    device stands for CUDA here; outside graph_safe a meta budget is refused for holding no values.)"""
    model = ak.patch(tiny_llava(seed=89, num_layers=4), "H", rank=2, backend="torch")
    inputs = example_inputs(model, batch_size=1, seed=90)
    refused = "latency_budget: a tensor on meta is read back .* give floats or a CPU"
    with torch.no_grad(), ak.graph_safe():
        with pytest.raises(ValueError, match=refused):
            model(**inputs, latency_budget=torch.tensor(0.6, device="meta"))
        out = model(**inputs, latency_budget=torch.tensor(0.6))  # on the CPU: read without waiting for a device
        step = dict(input_ids=inputs["input_ids"][:, -1:], **{CACHE_KWARG: cache_of(out)})
        with pytest.raises(ValueError, match=refused):
            model(**step, latency_budget=torch.tensor(0.6, device="meta"))
        model(**step, latency_budget=torch.tensor(0.6))


def test_a_dense_layer_made_while_capturing_is_not_cached(monkeypatch):
    """The caching rule of the test below, on the CPU with a capture faked: buffers made while capturing are new at
    every call and not kept; the first call after the capture makes the cached ones. A real capture asks of a
    tensor's or device's CUDA stream (``capturing``)."""
    import importlib

    from adaptive_kernels import graphs

    plan_module = importlib.import_module("adaptive_kernels.plan")  # the package's name plan is the function

    shape = DecoderShape(num_layers=2, hidden_size=24, num_heads=6, num_kv_heads=2, head_dim=4, intermediate_size=30)
    cpu = torch.device("cpu")
    monkeypatch.setattr(plan_module, "capturing", lambda device: True, raising=False)
    captured = [dense_layer(11, shape, cpu) for _ in range(2)]
    monkeypatch.undo()
    eager = dense_layer(11, shape, cpu)
    assert len({id(layer) for layer in [*captured, eager]}) == 3 and dense_layer(11, shape, cpu) is eager
    assert torch.equal(eager.q_to_kv, (torch.arange(6) // 3).expand(11, 6))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert graphs.capturing(torch.device("cuda")) and graphs.capturing("cuda:1")
    assert not graphs.capturing(cpu) and not graphs.capturing(torch.zeros(1))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_index_buffers_made_inside_a_capture_are_not_kept_for_later_calls():
    """A tensor made inside a capture holds its values only once the graph replays: a dense layer's buffers, first
    made there (a batch size no request warmed up), are not cached, and the eager call after the capture (no replay
    yet) makes and reads its own."""
    shape = DecoderShape(num_layers=2, hidden_size=24, num_heads=6, num_kv_heads=2, head_dim=4, intermediate_size=30)
    device = torch.device("cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = dense_layer(13, shape, device)
    eager = dense_layer(13, shape, device)
    assert eager.q_to_kv is not captured.q_to_kv
    assert eager is dense_layer(13, shape, device)  # cached outside a capture
    assert torch.equal(eager.q_to_kv.cpu(), (torch.arange(6) // 3).expand(13, 6))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_captured_prefill_continues_each_replays_prompt_on_the_gpu(backend):
    """A prefill at a budget captured as one CUDA graph and replayed for one prompt after another, each replay
    continued by eager decode steps (themselves replayed as the model's own decode graphs): each continues that
    replay's prompt as an eager request of it does."""
    stock = tiny_llava(seed=86, num_layers=6).cuda()
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend=backend)
    embed = model.model.language_model.embed_tokens
    prompts = [embed(example_inputs(stock, batch_size=1, seed=seed)["input_ids"].cuda()).detach() for seed in (87, 88)]

    with torch.no_grad():
        static = prompts[0].clone()
        with ak.graph_safe():
            continued_greedy(model, model(inputs_embeds=static, latency_budget=0.6), 4)  # compiles, tunes kernels
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(inputs_embeds=static, latency_budget=0.6)
        check_replays_continued(model, graph, static, out, prompts, 4, dict(rtol=2e-3, atol=2e-3))


def test_a_reset_cache_made_in_a_capture_holds_no_position_and_starts_a_new_request(monkeypatch):
    """``reset()`` forgets every position: also for a cache a captured prefill made (a replay of it had set where
    it stands, not yet read). It then counts 0 positions, and a prefill given it starts a new request, whose
    logits are those of a request given no cache."""
    stock = tiny_llava(seed=142, num_layers=4)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch")
    ids = example_inputs(stock, batch_size=1, text_tokens=5, seed=143)["input_ids"]
    embeds = model.model.language_model.embed_tokens(ids).detach()
    with torch.no_grad():
        static = embeds.clone()
        graph = CpuGraph(monkeypatch)
        with graph.capture():
            cache = cache_of(model(inputs_embeds=static, latency_budget=0.6))
        graph.replay()  # its replays set where the cache stands, which the next count reads
        cache.reset()
        assert cache.get_seq_length() == 0
        again = model(inputs_embeds=embeds, latency_budget=0.7, **{CACHE_KWARG: cache})
        fresh = model(inputs_embeds=embeds, latency_budget=0.7)
    assert torch.equal(again.logits, fresh.logits)
    assert cache_of(again).get_seq_length() == cache_of(fresh).get_seq_length() == ids.shape[1] + 1


def test_hidden_states_of_replayed_decode_steps_keep_their_values_after_later_steps(monkeypatch):
    """Greedy decode steps through the language model (decode graphs on the tests' CPU stand-in for a CUDA graph,
    ``cpu_decode_graphs``): each step's ``last_hidden_state``, kept until every step has run, equals that step's
    from the same steps run eagerly (graphs off), every element, for a padded batch under per-row budgets."""
    cpu_decode_graphs(monkeypatch)
    stock = tiny_llava(seed=150, num_layers=4)
    inputs = example_inputs(stock, batch_size=2, text_tokens=6, seed=151, pad=[0, 3])
    kept = {}
    for graphs in (True, False):
        model = replaying_decode_steps(ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch",
                                                cuda_graphs=graphs))
        lm = model.model.language_model
        with torch.no_grad():
            out = model(**inputs, latency_budget=[0.6, 0.85])
            cache, mask = cache_of(out), inputs["attention_mask"]
            token, hidden = out.logits[:, -1].argmax(-1, keepdim=True), []
            for _ in range(6):
                mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
                step = lm(inputs_embeds=lm.embed_tokens(token), attention_mask=mask, **{CACHE_KWARG: cache})
                hidden.append(step.last_hidden_state)
                token = model.lm_head(step.last_hidden_state[:, -1]).argmax(-1, keepdim=True)
        kept[graphs] = hidden
    assert len(kept[True]) == len(kept[False]) == 6
    for k, (got, want) in enumerate(zip(kept[True], kept[False])):
        torch.testing.assert_close(got, want, msg=lambda m: f"decode step {k}: {m}")
