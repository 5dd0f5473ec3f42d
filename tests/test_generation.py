"""Greedy generation queued a step ahead (adaptive_kernels.generation) against transformers' own loop.

On the CPU nothing runs asynchronously, so the package runs ahead on CUDA only; these tests let it run
ahead on the CPU too, where its ids, its forward calls and its host reads can be checked.
"""

from __future__ import annotations

import collections
import copy
import threading

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

import adaptive_kernels as ak
from adaptive_kernels import ExecutionPlan, generation
from adaptive_kernels.graphs import DecodeGraph
from adaptive_kernels.tiny import example_inputs, tiny_llava, tiny_llava_config
from oracles import CACHE_KWARG, DispatchedOps, cache_of, cpu_decode_graphs, replaying_decode_steps

NEW_TOKENS = 8
HOST_READS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.nonzero.default",
              "aten.equal.default", "aten.item.default"}


@pytest.fixture(scope="module")
def stock():
    return tiny_llava(seed=40, num_layers=4)


@pytest.fixture(scope="module")
def inputs(stock):
    return example_inputs(stock, batch_size=2, text_tokens=5, seed=41, pad=[2, 0])


class Collect(BaseStreamer):
    def __init__(self):
        self.tokens = []

    def put(self, value):
        self.tokens.append(value)

    def end(self):
        pass


def generate_counting(model, inputs, ahead_on_cpu: bool, monkeypatch, **kw):
    """(ids, forward calls) of ``model.generate(**inputs, **kw)``, running ahead on the CPU or not (on
    CUDA it runs ahead unless ``kw`` or the model's CUDA-graph setting rule it out)."""
    monkeypatch.setattr(generation, "RUN_AHEAD_DEVICES", ("cuda", "cpu") if ahead_on_cpu else ("cuda",))
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, **kw)
    finally:
        handle.remove()
    return (out if isinstance(out, torch.Tensor) else out.sequences), len(calls)


def stopping_tokens(model, inputs, request: dict, monkeypatch) -> list[int]:
    """End-of-sequence ids that stop row 0 at its 2nd new token and row 1 at its 3rd (or sooner)."""
    ids, _ = generate_counting(model, inputs, False, monkeypatch, do_sample=False, **request)
    prompt = inputs["input_ids"].shape[1]
    return [int(ids[0, prompt + 1]), int(ids[1, prompt + 2])]


REQUESTS = {"budget": lambda: {"latency_budget": [0.6, 0.9]},
            "plan": lambda: {"execution_plan": ExecutionPlan.full(2, 4, 8)},
            "none": lambda: {}}
STOPS = {"length": lambda eos: {},  # the tiny model's own end-of-sequence id, which it does not reach
         "no_eos": lambda eos: {"eos_token_id": None, "pad_token_id": None},  # no end-of-sequence criterion, no padding
         "eos": lambda eos: {"eos_token_id": eos, "pad_token_id": 0},
         "eos_after_min": lambda eos: {"eos_token_id": eos, "pad_token_id": 0, "min_new_tokens": 3}}


@pytest.mark.parametrize("stop", list(STOPS))
@pytest.mark.parametrize("request_kind", list(REQUESTS))
def test_running_ahead_returns_the_ids_of_transformers_loop(stock, inputs, monkeypatch, request_kind, stop):
    """Same ids as transformers' greedy loop; one forward more exactly when every row stopped before the
    length limit (the step queued ahead, then dropped)."""
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    request = REQUESTS[request_kind]()
    kw = {"do_sample": False, **request, **STOPS[stop](stopping_tokens(model, inputs, request, monkeypatch))}
    theirs, their_calls = generate_counting(model, inputs, False, monkeypatch, **kw)
    ours, our_calls = generate_counting(model, inputs, True, monkeypatch, **kw)
    assert torch.equal(ours, theirs)
    stopped_early = theirs.shape[1] < inputs["input_ids"].shape[1] + NEW_TOKENS
    if stop != "eos_after_min":  # the cases cover both ends (min_new_tokens changes which ids come)
        assert stopped_early == (stop == "eos")
    assert our_calls == their_calls + stopped_early
    if request_kind != "budget":  # a full plan is the stock model
        plain = {k: v for k, v in kw.items() if k not in request}
        assert torch.equal(ours, generate_counting(stock, inputs, False, monkeypatch, **plain)[0])


def test_a_dynamic_rope_model_leaves_its_rotary_frequencies_as_stock_does(monkeypatch):
    """Dynamic NTK scaling grows the rotary frequencies with the longest sequence a call has seen. Running ahead,
    the step queued after every row stopped, then dropped, grew them one position past stock's, for the next
    request too. Such a model decodes in transformers' loop: its frequencies, and the next request's logits, are
    stock's."""
    config = tiny_llava_config(num_layers=2)
    config.text_config.max_position_embeddings = 24
    config.text_config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        stock = LlavaForConditionalGeneration(config).eval()
    inputs = example_inputs(stock, text_tokens=6)  # 22 positions: decoding goes past the 24 the scaling starts at
    prompt = inputs["input_ids"].shape[1]
    probe, _ = generate_counting(stock, inputs, False, monkeypatch, do_sample=False, eos_token_id=None)
    new = probe[0, prompt:].tolist()
    eos = next(token for k, token in enumerate(new) if k >= 3 and token not in new[:k])  # stops at 26 or more
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    kw = {"do_sample": False, "eos_token_id": eos, "pad_token_id": 0}
    ours, _ = generate_counting(model, inputs, True, monkeypatch, **kw)
    theirs, _ = generate_counting(stock, inputs, False, monkeypatch, **kw)
    assert torch.equal(ours, theirs) and prompt + 3 < ours.shape[1] < prompt + NEW_TOKENS
    ours_rope, their_rope = model.model.language_model.rotary_emb, stock.model.language_model.rotary_emb
    assert ours_rope.max_seq_len_cached == their_rope.max_seq_len_cached
    assert torch.equal(ours_rope.inv_freq, their_rope.inv_freq)
    following = example_inputs(stock, text_tokens=8, seed=3)
    with torch.no_grad():
        assert torch.equal(model(**following).logits, stock(**following).logits)


@pytest.mark.parametrize("request_kind", list(REQUESTS))
def test_use_cache_none_is_generate_left_to_its_default(stock, inputs, monkeypatch, request_kind):
    """use_cache=None given to generate reads as unset, as forward reads it: the ids of a call without it, with every
    unit on those of stock's default (cached) generate. It failed on the second step's mask."""
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    kw = {"do_sample": False, **REQUESTS[request_kind]()}
    ours, _ = generate_counting(model, inputs, False, monkeypatch, use_cache=None, **kw)
    assert torch.equal(ours, generate_counting(model, inputs, False, monkeypatch, **kw)[0])
    if request_kind != "budget":
        assert torch.equal(ours, generate_counting(stock, inputs, False, monkeypatch, do_sample=False)[0])


def test_logits_processors_get_the_float32_scores_of_transformers_loop_from_a_bfloat16_model(stock, inputs,
                                                                                           monkeypatch):
    """transformers' loop hands logits processors the last position's logits cast to float32, whatever the
    model's dtype; running ahead hands them the same scores at each step, and so picks the same ids."""
    model = ak.patch(copy.deepcopy(stock).to(torch.bfloat16), "H", rank=2)

    class Record(LogitsProcessor):
        def __init__(self):
            self.scores = []

        def __call__(self, input_ids, scores):
            self.scores.append(scores.clone())
            return scores

    kw = {"do_sample": False, "latency_budget": [0.6, 0.9]}  # the length limit stops it: no step dropped
    loop, ahead = Record(), Record()
    theirs, _ = generate_counting(model, inputs, False, monkeypatch, logits_processor=LogitsProcessorList([loop]), **kw)
    ours, _ = generate_counting(model, inputs, True, monkeypatch, logits_processor=LogitsProcessorList([ahead]), **kw)
    assert torch.equal(ours, theirs)
    assert len(ahead.scores) == len(loop.scores) == NEW_TOKENS
    for mine, want in zip(ahead.scores, loop.scores):
        assert want.dtype == mine.dtype == torch.float32
        assert torch.equal(mine, want)


@pytest.mark.parametrize("option", ["return_dict_in_generate", "do_sample", "streamer", "cuda_graphs_off",
                                    "repatched_cuda_graphs_off", "use_cache_off"])
def test_calls_that_would_see_the_queued_step_run_transformers_loop(stock, inputs, monkeypatch, option):
    """Returned scores, sampling (its random draws), a streamer (which gets every token), CUDA graphs turned off
    (also by patching again), or no cache (each step feeds the whole sequence; no budget then, which needs the
    cache): no step is queued ahead, so no forward more than transformers' loop makes."""
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, cuda_graphs=option != "cuda_graphs_off")
    if option == "repatched_cuda_graphs_off":
        ak.patch(model, "H", rank=2, cuda_graphs=False)
    request = {} if option == "use_cache_off" else {"latency_budget": [0.6, 0.9]}
    kw = {"do_sample": False, **request, "eos_token_id": stopping_tokens(model, inputs, request, monkeypatch),
          "pad_token_id": 0}
    kw.update({"return_dict_in_generate": {"return_dict_in_generate": True}, "do_sample": {"do_sample": True},
               "streamer": {"streamer": Collect()}, "use_cache_off": {"use_cache": False}}.get(option, {}))
    theirs, their_calls = generate_counting(model, inputs, False, monkeypatch, **kw)
    ours, our_calls = generate_counting(model, inputs, True, monkeypatch, **kw)
    assert torch.equal(ours, theirs)
    assert our_calls == their_calls
    if option == "streamer":  # each run streamed the prompt, then each new token
        streamed = [t.reshape(ours.shape[0], -1) for t in kw["streamer"].tokens]
        run = len(streamed) // 2
        assert torch.equal(torch.cat(streamed[:run], 1), theirs) and torch.equal(torch.cat(streamed[run:], 1), ours)


def test_a_cache_the_caller_keeps_is_left_as_transformers_loop_leaves_it(stock, monkeypatch):
    """A returned cache passed back in stays the caller's: no step is queued ahead into it, so it ends with
    the positions and values transformers' loop leaves, after the same forward calls and ids."""
    inputs = example_inputs(stock, seed=71)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    with torch.no_grad():
        first = model.generate(**inputs, latency_budget=0.6, max_new_tokens=4, do_sample=False,
                               return_dict_in_generate=True)
    cache = cache_of(first)
    ids = torch.cat([first.sequences, torch.tensor([[5, 6, 7]])], 1)
    more = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    probe, _ = generate_counting(model, more | {CACHE_KWARG: copy.deepcopy(cache)}, False, monkeypatch, do_sample=False)
    kw = {"do_sample": False, "eos_token_id": int(probe[0, ids.shape[1] + 1]), "pad_token_id": 0}  # stops early
    theirs_cache, ours_cache = copy.deepcopy(cache), copy.deepcopy(cache)
    theirs, their_calls = generate_counting(model, more | {CACHE_KWARG: theirs_cache}, False, monkeypatch, **kw)
    ours, our_calls = generate_counting(model, more | {CACHE_KWARG: ours_cache}, True, monkeypatch, **kw)
    assert theirs.shape[1] < ids.shape[1] + NEW_TOKENS
    assert torch.equal(ours, theirs) and our_calls == their_calls
    assert ours_cache.length == theirs_cache.length
    for mine, want in zip(ours_cache.keys + ours_cache.values, theirs_cache.keys + theirs_cache.values):
        assert (mine is None) == (want is None)
        assert mine is None or torch.equal(mine[:, :, :ours_cache.length], want[:, :, :theirs_cache.length])


def test_decode_steps_read_nothing_back_but_the_late_flag(stock, inputs, monkeypatch):
    """Each decode step of a budget's request, the patched forward included, reads one value on the host:
    the finished flag of the step before. Any other read would make the host wait for the step it queued."""
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    monkeypatch.setattr(generation, "RUN_AHEAD_DEVICES", ("cuda", "cpu"))
    flag_reads = collections.Counter()
    push = generation.LateFinishFlag.push

    def counted_push(self, unfinished):
        flag_reads["steps"] += 1
        return push(self, unfinished)

    monkeypatch.setattr(generation.LateFinishFlag, "push", counted_push)

    def reads(new_tokens: int) -> int:
        with DispatchedOps() as ops, torch.no_grad():
            model.generate(**inputs, latency_budget=[0.6, 0.9], do_sample=False, max_new_tokens=new_tokens)
        return sum(name in HOST_READS for name in ops.seen)

    short, long = reads(3), reads(3 + NEW_TOKENS)
    assert long - short == NEW_TOKENS  # one per extra step
    assert flag_reads["steps"] == 3 + 3 + NEW_TOKENS  # ... and it is the flag's


def check_graphed_run_ahead(fast, plain, inputs, stop: str, monkeypatch, replayed: bool) -> None:
    """Asserts that greedy generate of ``fast`` (cuda_graphs on, running ahead) gives the ids of ``plain``'s
    (cuda_graphs off: transformers' loop over eager steps) at budgets 0.6 and 0.9, with one forward more where the
    rows stop early (``stop``), and that some of its decode steps were graph replays or, where not ``replayed``
    (the torch backend on CUDA), none."""
    request = {"latency_budget": [0.6, 0.9]}
    kw = {"do_sample": False, **request, **STOPS[stop](stopping_tokens(plain, inputs, request, monkeypatch))}
    theirs, their_calls = generate_counting(plain, inputs, False, monkeypatch, **kw)
    replays = []
    replay = DecodeGraph.replay
    monkeypatch.setattr(DecodeGraph, "replay", lambda self, *args: replays.append(1) or replay(self, *args))
    ours, our_calls = generate_counting(fast, inputs, True, monkeypatch, **kw)
    assert torch.equal(ours, theirs)
    assert our_calls == their_calls + (stop == "eos") and bool(replays) == replayed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stop", ["length", "eos"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_on_cuda_graphed_greedy_runs_ahead_with_the_ids_of_transformers_loop(stock, inputs, monkeypatch, backend,
                                                                               stop):
    """On CUDA a patched model runs ahead by default, with CUDA-graph decode; its ids equal those of
    transformers' loop over eager steps (cuda_graphs=False)."""
    fast = ak.patch(copy.deepcopy(stock).cuda(), "H", rank=2, backend=backend)
    plain = ak.patch(copy.deepcopy(stock).cuda(), "H", rank=2, backend=backend, cuda_graphs=False)
    check_graphed_run_ahead(fast, plain, {k: v.cuda() for k, v in inputs.items()}, stop, monkeypatch,
                            replayed=backend != "torch")


@pytest.mark.parametrize("stop", ["length", "eos"])
def test_graphed_greedy_runs_ahead_with_the_ids_of_transformers_loop_on_the_cpu(stock, inputs, monkeypatch, stop):
    """The test above on the CPU: running ahead there, decode graphs captured and replayed through the tests'
    stand-in for a CUDA graph (``cpu_decode_graphs``), on the torch backend made to replay its steps."""
    cpu_decode_graphs(monkeypatch)
    fast = replaying_decode_steps(ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch"))
    plain = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch", cuda_graphs=False)
    check_graphed_run_ahead(fast, plain, inputs, stop, monkeypatch, replayed=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_on_cuda_threads_generating_at_once_each_get_their_own_ids(stock, inputs, backend):
    """Three threads share one patched model on CUDA, each generating with its own budgets while the others
    prefill, tune kernels and capture decode graphs: each gets the ids it gets alone, afterwards."""
    model = ak.patch(copy.deepcopy(stock).cuda(), "H", rank=2, backend=backend)
    on_cuda = {k: v.cuda() for k, v in inputs.items()}
    budgets = ([0.6, 0.9], [1.0, 0.45], [0.75, 0.75])

    def generate(budget):
        with torch.no_grad():
            return model.generate(**on_cuda, latency_budget=budget, do_sample=False, max_new_tokens=3 * NEW_TOKENS)

    start, together, failures = threading.Barrier(len(budgets)), {}, []

    def run(i):
        start.wait()
        try:
            together[i] = [generate(budgets[i]) for _ in range(2)]
        except Exception as error:  # reported below, with the thread's budget
            failures.append((budgets[i], repr(error)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(budgets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    for i, budget in enumerate(budgets):
        alone = generate(budget)
        assert all(torch.equal(ids, alone) for ids in together[i]), budget


def test_late_finish_flag_reports_the_step_before():
    flag = generation.LateFinishFlag(torch.device("cpu"))
    steps = [torch.tensor([1, 1]), torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([0, 0])]
    assert [flag.push(unfinished) for unfinished in steps] == [False, False, False, True]


def test_a_generate_call_that_raises_leaves_the_cache_counting_positions():
    """``get_seq_length()`` outside an ``input_id_view`` counts every filled position, the latency token's
    included (AdaptiveCache's docstring). generate counts a given cache in such a view; a generate call that
    raises inside transformers' generate (an unknown keyword here) ends the view with it: the cache still counts
    its positions after, and ``crop(n)`` keeps n positions, as a copy that never saw the failed call does."""
    stock = tiny_llava(seed=140, num_layers=4)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    inputs = example_inputs(stock, batch_size=2, text_tokens=7, seed=141, pad=[0, 3])
    with torch.no_grad():
        first = model.generate(**inputs, latency_budget=[0.55, 0.9], max_new_tokens=3, do_sample=False,
                               eos_token_id=None, return_dict_in_generate=True)
    cache = cache_of(first)
    # the prompt, the latency token and the new tokens but the last (which no step has fed yet)
    positions = inputs["input_ids"].shape[1] + 1 + 3 - 1
    assert cache.get_seq_length() == positions
    untouched = copy.deepcopy(cache)
    ids = first.sequences
    with torch.no_grad(), pytest.raises(ValueError, match="not_a_model_kwarg"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), latency_budget=[0.55, 0.9],
                       max_new_tokens=2, not_a_model_kwarg=1, **{CACHE_KWARG: cache})
    assert cache.get_seq_length() == untouched.get_seq_length() == positions
    keep = positions - 2  # past the latency token (column inputs["input_ids"].shape[1])
    cache.crop(keep)
    untouched.crop(keep)
    assert cache.length == untouched.length == keep


def test_synced_gpus_run_transformers_loop(stock, inputs, monkeypatch, tmp_path):
    """synced_gpus=True (ZeRO-3 / FSDP: every rank steps until all have finished, for the collectives inside
    forward): no step is queued ahead, since a rank that returned early would leave the others waiting; the
    same ids and exactly the forward calls of transformers' loop, where the rows stop early (one process group
    of one rank here)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = ak.patch(copy.deepcopy(stock), "H", rank=2)
        request = REQUESTS["budget"]()
        kw = {"do_sample": False, "eos_token_id": stopping_tokens(model, inputs, request, monkeypatch),
              "pad_token_id": 0, "synced_gpus": True, **request}
        theirs, their_calls = generate_counting(model, inputs, False, monkeypatch, **kw)
        ours, our_calls = generate_counting(model, inputs, True, monkeypatch, **kw)
    finally:
        dist.destroy_process_group()
    assert theirs.shape[1] < inputs["input_ids"].shape[1] + 8  # stopped early
    assert torch.equal(ours, theirs) and our_calls == their_calls
