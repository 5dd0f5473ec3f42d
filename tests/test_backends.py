"""Every backend, device and dtype, and Llama shapes beside the tiny default, give the masked computation;
CUDA-graph decode gives the eager result."""

from __future__ import annotations

import copy
import os
import sys
import threading

import pytest
import torch
from transformers.activations import ACT2FN

import adaptive_kernels as ak
from adaptive_kernels import ExecutionPlan
from adaptive_kernels.graphs import DecodeGraph
from adaptive_kernels.models.llama import lay_out_qkv
from adaptive_kernels.models.llava import prompt_embeddings
from adaptive_kernels.ops import runs, swiglu
from adaptive_kernels.ops._library import HAS_TRITON
from adaptive_kernels.sliced import masked_stock, sliced_stock
from adaptive_kernels.tiny import example_inputs, tiny_llava
from oracles import (CACHE_KWARG, cache_of, cpu_decode_graphs, fed_latency_token, prompt_labels, replaying_decode_steps,
                     stock_of_shape)

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or not HAS_TRITON,
                                 reason="Triton runs CPU tensors only in its interpreter (set when CUDA is absent), "
                                        "and only when installed")
CASES = [pytest.param("cpu", "triton", torch.float32, id="cpu-triton-fp32", marks=interpreter)]
CASES += [pytest.param("cuda", backend, dtype, id=f"cuda-{backend}-{str(dtype)[6:]}", marks=gpu)
          for backend in ("torch", "triton", "cuda") for dtype in (torch.float32, torch.float16, torch.bfloat16)]
FP32_CASES = [case for case in CASES if case.values[2] == torch.float32]
CPU_FP32 = dict(rtol=1e-4, atol=1e-5)  # float32 on the CPU, in Triton's interpreter too: no TF32
CUDA_FP32 = dict(rtol=2e-3, atol=2e-3)  # float32 on CUDA: our kernels' products in TF32


def _plan(batch, layers, heads, seed, device):
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(batch, layers, generator=g) < 0.8
    h = (torch.rand(batch, layers, heads, generator=g) < 0.5) & on[..., None]
    gr = (torch.rand(batch, layers, heads, generator=g) < 0.5) & on[..., None]
    h[:, 2], gr[:, 3] = False, False
    return ExecutionPlan(on, h, gr).to(device)


@pytest.mark.parametrize("device,backend,dtype", CASES)
def test_backend_gives_the_masked_computation(device, backend, dtype):
    stock = tiny_llava(seed=21, num_layers=4).to(device=device, dtype=dtype)
    inputs = example_inputs(stock, batch_size=3, text_tokens=5, seed=22, pad=[0, 2, 1])
    plan = _plan(3, 4, 8, seed=23, device=device)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend=backend)
    with torch.no_grad():
        ours = model(**inputs, execution_plan=plan).logits.float()
        stock_in_dtype = masked_stock(stock, plan)(**inputs).logits.float()
        reference = masked_stock(stock.float(), plan)(**{k: v.float() if v.is_floating_point() else v
                                                         for k, v in inputs.items()}).logits
    valid = inputs["attention_mask"].bool()
    ours, stock_in_dtype, reference = ours[valid], stock_in_dtype[valid], reference[valid]
    if dtype == torch.float32:
        torch.testing.assert_close(ours, reference, **(CPU_FP32 if device == "cpu" else CUDA_FP32))
    else:  # within a few times the rounding of the stock model's own masked computation in that dtype: the
        # logits are below 1 and one skipped neuron group moves them by about 0.04, so no fixed bar serves
        stock_error = (stock_in_dtype - reference).abs().max()
        assert (ours - reference).abs().max() <= 4 * stock_error + 2e-3, stock_error


def test_every_layer_with_a_neuron_on_runs_the_fused_swiglu(monkeypatch):
    """hidden_act="silu" (transformers' own SiLU module): gate, up and activation run as the backend's one SwiGLU
    op, once per layer that a row runs with a neuron on, and the forward is the masked computation."""
    calls = []
    by_runs = runs.swiglu_by_runs  # the torch backend's SwiGLU outside graph-safe requests
    monkeypatch.setattr(runs, "swiglu_by_runs", lambda *args: calls.append(1) or by_runs(*args))
    stock = tiny_llava(seed=21, num_layers=4)
    inputs = example_inputs(stock, batch_size=3, text_tokens=5, seed=24, pad=[0, 2, 1])
    plan = _plan(3, 4, 8, seed=25, device="cpu")
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, execution_plan=plan).logits,
                                   masked_stock(stock, plan)(**inputs).logits, **CPU_FP32)
    assert len(calls) == int(plan.groups.any(-1).any(0).sum()) > 0


OTHER_SHAPES = {  # valid Llama text configs beside tiny_llava's, at toy sizes
    "biased, head size apart from hidden/heads": dict(num_heads=4, num_kv_heads=2, hidden_size=40, head_dim=12,
                                                      attention_bias=True, mlp_bias=True),
    "one kv head, biased mlp": dict(num_heads=6, num_kv_heads=1, hidden_size=48, head_dim=8, mlp_bias=True),
    "three heads of 20, biased attention": dict(num_heads=3, num_kv_heads=3, hidden_size=36, head_dim=20,
                                                attention_bias=True),
}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter)])
@pytest.mark.parametrize("sizes", list(OTHER_SHAPES.values()), ids=list(OTHER_SHAPES))
def test_other_llama_shapes_give_the_masked_and_sliced_computation(sizes, backend):
    """Projection biases, a head size that is not hidden/heads, one kv head: the forward is the masked
    computation, and each row decodes as the stock model with its weights cut to the plan."""
    stock = stock_of_shape(53, **sizes)
    inputs = example_inputs(stock, batch_size=2, seed=59, pad=[0, 3])
    plan = _plan(2, 4, sizes["num_heads"], seed=61, device="cpu")
    model = ak.patch(copy.deepcopy(stock), "H", rank=1, backend=backend)
    run = dict(max_new_tokens=3, do_sample=False, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, execution_plan=plan).logits,
                                   masked_stock(stock, plan)(**inputs).logits, **CPU_FP32)
        ours = model.generate(**inputs, execution_plan=plan, **run)
        for row in range(2):
            want = sliced_stock(stock, plan, row).generate(**{k: v[row:row + 1] for k, v in inputs.items()}, **run)
            assert torch.equal(ours.sequences[row:row + 1], want.sequences)
            for got, theirs in zip(ours.logits, want.logits, strict=True):
                torch.testing.assert_close(got[row:row + 1], theirs, **CPU_FP32)


def _assert_a_plan_is_the_masked_computation(stock, backend: str, seed: int) -> None:
    """``stock`` (4 layers of 4 heads) patched for variant H at rank 1 on ``backend``: its forward under a random
    plan, on two prompts of which one is padded, gives the masked computation's logits."""
    inputs = example_inputs(stock, batch_size=2, seed=seed, pad=[0, 2])
    plan = _plan(2, 4, 4, seed=seed + 1, device="cpu")
    model = ak.patch(copy.deepcopy(stock), "H", rank=1, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, execution_plan=plan).logits,
                                   masked_stock(stock, plan)(**inputs).logits, **CPU_FP32)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "relu"])
def test_an_mlp_activation_other_than_silu_is_the_masked_computation(act):
    """A Llama config's hidden_act need not be silu: the MLP runs gate, up and that activation (not the fused
    SwiGLU), and the forward is the masked computation."""
    stock = stock_of_shape(54, num_heads=4, num_kv_heads=2, hidden_size=32)
    stock.config.text_config.hidden_act = act
    for layer in stock.model.language_model.layers:  # as a model built from that config has them
        layer.mlp.act_fn = ACT2FN[act]
    _assert_a_plan_is_the_masked_computation(stock, "torch", seed=55)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter)])
def test_biases_on_some_of_q_k_v_only_are_the_masked_computation(backend):
    """A decoder whose k and v projections have biases and whose q projection has none (a model edited by hand):
    its q, k and v weights run as one product only with biases on all three or none; these keep their biases."""
    stock = stock_of_shape(57, num_heads=4, num_kv_heads=2, hidden_size=32, attention_bias=True)
    for layer in stock.model.language_model.layers:
        layer.self_attn.q_proj.bias = None
    _assert_a_plan_is_the_masked_computation(stock, backend, seed=58)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter)])
def test_a_bias_on_the_up_projection_alone_is_the_masked_computation(backend):
    """An MLP whose up projection has a bias and whose gate projection has none (edited by hand): gate, up and the
    activation run apart (the fused SwiGLU takes no bias), and the up projection keeps its bias."""
    stock = stock_of_shape(62, num_heads=4, num_kv_heads=2, hidden_size=32)
    for layer in stock.model.language_model.layers:
        up = layer.mlp.up_proj
        up.bias = torch.nn.Parameter(torch.randn(up.out_features, generator=torch.Generator().manual_seed(63)) / 2)
    _assert_a_plan_is_the_masked_computation(stock, backend, seed=64)


def _grads(model, inputs, seed, **kw):
    """(loss, {parameter name: gradient}) of one training step with labels = the prompt (padding ignored)."""
    labels = prompt_labels(inputs)
    torch.manual_seed(seed)  # the Gumbel draws of a budget
    loss = model.train()(**inputs, labels=labels, **kw).loss
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device,backend,dtype", FP32_CASES)
def test_backend_trains_as_the_masked_computation(device, backend, dtype):
    """Gradients through the kernels (their backward is their reference's) equal the masked stock model's,
    under a given plan (every layer through the ops) and, against the torch backend, under a budget (prefix).
    In fp32 only."""
    stock = tiny_llava(seed=30, num_layers=4).to(device)
    inputs = example_inputs(stock, batch_size=2, text_tokens=5, seed=31, pad=[0, 2])
    plan = _plan(2, 4, 8, seed=32, device=device)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend=backend)
    loss, grads = _grads(model, inputs, seed=0, execution_plan=plan)
    want_loss, want = _grads(masked_stock(stock, plan), inputs, seed=0)
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-5)
    assert set(grads) <= set(want)
    for name in want:  # a weight no row reads gets no gradient here, and zeros through the masks
        got = grads.get(name, torch.zeros_like(want[name]))
        torch.testing.assert_close(got, want[name], rtol=1e-3, atol=1e-5, msg=name)
    reference = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch")
    loss, grads = _grads(copy.deepcopy(model), inputs, seed=1, latency_budget=[0.6, 0.85])
    want_loss, want = _grads(reference, inputs, seed=1, latency_budget=[0.6, 0.85])
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-5)
    assert "model.language_model.latency_scheduler.head.weight" in want and set(grads) == set(want)
    for name in want:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("device,backend,dtype", FP32_CASES)
def test_backend_generates_what_the_torch_backend_and_sliced_stock_generate(device, backend, dtype):
    """Greedy generate under per-row budgets: the torch backend's ids and logits, and each row's those of the stock
    model cut to its plan, fed the prompt and the latency token. In fp32, where backends agree to rounding."""
    stock = tiny_llava(seed=24, num_layers=4).to(device)
    inputs = example_inputs(stock, batch_size=2, text_tokens=5, seed=25)
    reference = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch", cuda_graphs=False)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend=backend)
    budgets = [0.7, 0.9]
    run = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ours, theirs = (m.generate(**inputs, latency_budget=budgets, **run) for m in (model, reference))
        plan = ak.plan(model, latency_budget=budgets, **inputs)
        embeds, mask = fed_latency_token(model, stock, inputs, budgets)
        sliced = [sliced_stock(stock, plan, row).generate(inputs_embeds=embeds[row:row + 1],
                                                          attention_mask=mask[row:row + 1], **run) for row in range(2)]
    tolerance = CPU_FP32 if device == "cpu" else dict(rtol=1e-3, atol=1e-3)
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.logits, theirs.logits, strict=True):
        torch.testing.assert_close(a, b, **tolerance)
    S = inputs["input_ids"].shape[1]
    for row, want in enumerate(sliced):
        assert torch.equal(ours.sequences[row:row + 1, S:], want.sequences)
        for a, b in zip(ours.logits, want.logits, strict=True):
            torch.testing.assert_close(a[row:row + 1], b, **tolerance)


def _decode_run(model, inputs: dict, case: str):
    """(sequences, logits per step) of greedy generate with budgets, in one of the graph tests' cases."""
    run = dict(latency_budget=[0.6, 0.85], do_sample=False, output_logits=True, return_dict_in_generate=True)
    if case != "hidden":
        more = {"greedy": {}, "beams": {"num_beams": 3}, "past_capacity": {"max_new_tokens": 8}}[case]
        out = model.generate(**inputs, **{"max_new_tokens": 6, **run, **more})
        return out.sequences, list(out.logits)
    # generate (a graph is captured), continue it collecting hidden states (eager steps), continue again
    # (the graph replays after them)
    out = model.generate(**inputs, max_new_tokens=4, **run)
    ids, logits = out.sequences, list(out.logits)
    cache = cache_of(out)
    run.pop("latency_budget")  # the cache keeps the plan and the latency token
    for extra in ({"output_hidden_states": True}, {}):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                             **{CACHE_KWARG: cache}, **run, **extra)
        ids, logits = out.sequences, logits + list(out.logits)
    return ids, logits


def _graph_decode_is_eager_decode(stock, case: str, backend: str, monkeypatch, tolerance: dict,
                                  replaying: bool = False) -> int:
    """Asserts that ``_decode_run`` of ``case`` gives the ids of cuda_graphs off with it on, and the logits within
    ``tolerance``, for ``stock`` patched with ``backend`` (with ``replaying``: made to replay its decode steps,
    ``replaying_decode_steps``); returns how many decode steps were graph replays (with graphs off: asserted
    none)."""
    inputs = example_inputs(stock, batch_size=2, seed=27, text_tokens=109 if case == "past_capacity" else 12)
    graphed, eager = (ak.patch(copy.deepcopy(stock), "H", rank=2, backend=backend, cuda_graphs=graphs)
                      for graphs in (True, False))
    if replaying:
        graphed, eager = replaying_decode_steps(graphed), replaying_decode_steps(eager)
    replays = []
    replay = DecodeGraph.replay
    monkeypatch.setattr(DecodeGraph, "replay", lambda self, *args: replays.append(1) or replay(self, *args))
    with torch.no_grad():
        a, a_logits = _decode_run(graphed, inputs, case)
        graphed_replays = len(replays)
        b, b_logits = _decode_run(eager, inputs, case)
    assert len(replays) == graphed_replays  # eager: never
    assert torch.equal(a, b)
    assert len(a_logits) == len(b_logits)
    for x, y in zip(a_logits, b_logits):
        torch.testing.assert_close(x, y, **tolerance)
    return graphed_replays


@gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("case", ["greedy", "beams", "hidden", "past_capacity"])
def test_cuda_graph_decode_equals_eager_decode(backend, case, monkeypatch):
    """Graph replay gives the eager logits exactly: greedy; beam search (the cache a graph reads is
    reordered in place); eager steps collecting hidden states between graphed ones; a cache that
    outgrows its 128 positions mid-decode (126 after prefill: a new graph, after an eager step). The torch
    backend, whose products read their weight runs on the host, decodes eagerly either way."""
    replays = _graph_decode_is_eager_decode(tiny_llava(seed=26).cuda(), case, backend, monkeypatch,
                                            dict(rtol=0, atol=0))
    assert (replays == 0) == (backend == "torch")


@pytest.mark.parametrize("case", ["greedy", "beams", "hidden", "past_capacity"])
def test_graph_decode_equals_eager_decode_on_the_cpu(case, monkeypatch):
    """The test above on the CPU: the model's decode graphs captured and replayed through the tests' stand-in
    for a CUDA graph (``cpu_decode_graphs``), on the torch backend made to replay its steps (as the kernel
    backends do) with graphs on and off. Replayed steps give the eager ids, and logits to the CPU's rounding
    (its products may round otherwise on the graph's own copies of the inputs), in each case."""
    cpu_decode_graphs(monkeypatch)
    replays = _graph_decode_is_eager_decode(tiny_llava(seed=26), case, "torch", monkeypatch, {}, replaying=True)
    assert replays > 0


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_assisted_decoding_with_cuda_graphs_equals_it_without(backend):
    """A draft model's tokens are verified several at a step, steps of changing lengths that a graph of one
    token's shapes cannot hold: with cuda_graphs on they run eagerly, and give the ids and logits of it off."""
    stock = tiny_llava(seed=28).cuda()
    inputs = example_inputs(stock, batch_size=1, seed=29)
    plan = _plan(1, 8, 8, seed=30, device="cuda")
    run = dict(execution_plan=plan, assistant_model=copy.deepcopy(stock), max_new_tokens=10, do_sample=False,
               output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        graphed, eager = (ak.patch(copy.deepcopy(stock), "H", rank=2, backend=backend, cuda_graphs=graphs)
                          .generate(**inputs, **run) for graphs in (True, False))
    assert torch.equal(graphed.sequences, eager.sequences)
    for x, y in zip(graphed.logits, eager.logits, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_assisted_decoding_with_graphs_equals_it_without_on_the_cpu(monkeypatch):
    """The test above on the CPU's stand-in for a CUDA graph (``cpu_decode_graphs``), on the torch backend made to
    replay its steps: a draft model's steps of changing lengths run eagerly beside the graphs, with the ids of
    graphs off, and logits to the CPU's rounding."""
    cpu_decode_graphs(monkeypatch)
    stock = tiny_llava(seed=28)
    inputs = example_inputs(stock, batch_size=1, seed=29)
    run = dict(execution_plan=_plan(1, 8, 8, seed=30, device="cpu"), assistant_model=copy.deepcopy(stock),
               max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    outputs = []
    for graphs in (True, False):
        model = replaying_decode_steps(ak.patch(copy.deepcopy(stock), "H", rank=2, backend="torch", cuda_graphs=graphs))
        with torch.no_grad():
            outputs.append(model.generate(**inputs, **run))
    graphed, eager = outputs
    assert torch.equal(graphed.sequences, eager.sequences)
    for x, y in zip(graphed.logits, eager.logits, strict=True):
        torch.testing.assert_close(x, y)


@gpu
def test_plan_on_the_wrong_device_is_refused():
    model = ak.patch(tiny_llava().cuda(), "H", rank=2)
    inputs = example_inputs(model, batch_size=1)
    with pytest.raises(ValueError, match="execution_plan.*device"):
        model(**inputs, execution_plan=ExecutionPlan.full(1, 8, 8))


def test_each_backend_is_made_of_its_own_ops(monkeypatch):
    """"triton" is the Triton ops, every one of them; "torch" the PyTorch references, but for the products, which
    read weight runs as views (ops.runs) outside graph-safe requests (a reference standing in for a kernel
    gives the same results, so only this shows it)."""
    from adaptive_kernels.backends import get_backend
    from adaptive_kernels.ops import attention, norm, projections, rotary
    triton = get_backend("triton")
    for field, op in (("rows_linear", projections.gather_rows_linear), ("cols_linear", projections.gather_cols_linear),
                      ("swiglu", swiglu.gathered_swiglu), ("attention", attention.head_sparse_attention),
                      ("rms_norm", norm.rms_norm), ("rotary", rotary.rotary)):
        assert getattr(triton, field) is op, field
    products = {"rows_linear": (runs, "rows_linear_by_runs", projections, "gather_rows_linear_reference"),
                "cols_linear": (runs, "cols_linear_by_runs", projections, "gather_cols_linear_reference"),
                "swiglu": (runs, "swiglu_by_runs", swiglu, "gathered_swiglu_reference")}
    for field, (by_runs_module, by_runs, gathered_module, gathered) in products.items():
        monkeypatch.setattr(by_runs_module, by_runs, lambda *args, name=by_runs: name)
        monkeypatch.setattr(gathered_module, gathered, lambda *args, name=gathered: name)
    torch_backend = get_backend("torch")
    x = torch.zeros(1)
    for field, (_, by_runs, _, gathered) in products.items():
        assert getattr(torch_backend, field)(x) == by_runs, field
        with ak.graph_safe():
            assert getattr(torch_backend, field)(x) == gathered, field
    for field, op in (("attention", attention.head_sparse_attention_reference), ("rms_norm", norm.rms_norm_reference),
                      ("rotary", rotary.rotary_reference)):
        assert getattr(torch_backend, field) is op, field


@interpreter
@pytest.mark.triton
@pytest.mark.parametrize("narrower", [torch.float16, torch.bfloat16])
def test_inputs_embeds_of_a_narrower_dtype_run_on_a_kernel_backend_as_their_values_in_the_models(narrower):
    """float16 or bfloat16 inputs_embeds for a float32 model, which stock promotes: the triton backend's kernels
    refused the mixed dtypes (in its rotary op, naming nothing given). They run as the same values in float32, with
    stock's rotary tables (made in their dtype), and agree with stock to the rounding stock applies to the first
    norm's output (to the embeddings' dtype)."""
    stock = tiny_llava(seed=33, num_layers=4)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="triton")
    inputs = example_inputs(stock, batch_size=2, seed=34)
    embeds = prompt_embeddings(stock, inputs).to(narrower)
    plan = _plan(2, 4, 8, seed=35, device="cpu")
    with torch.no_grad():
        for given, reference in (({}, stock), ({"execution_plan": plan}, masked_stock(stock, plan))):
            ours = model(inputs_embeds=embeds, **given).logits
            want = reference(inputs_embeds=embeds).logits
            torch.testing.assert_close(ours, want, rtol=0, atol=1e-2 if narrower == torch.bfloat16 else 1e-3)
            assert (ours - want).abs().max() > 0  # the rounding, there to be tolerated


@interpreter
@pytest.mark.triton
def test_training_after_a_dense_layer_ran_under_inference_mode_is_a_fresh_models():
    """The index list of a layer every row runs whole is kept for later requests; made by a request under
    torch.inference_mode, it was an inference tensor, which a training step after it (on a kernel backend, whose
    ops keep their inputs for backward) could not save. It is made as a normal tensor: the loss and gradients are a
    fresh model's."""
    stock = tiny_llava(seed=36, num_layers=2)
    inputs = example_inputs(stock, seed=37)
    plan = ExecutionPlan.full(1, 2, 8)

    def trained(model):
        model.train()
        loss = model(**inputs, labels=inputs["input_ids"], execution_plan=plan).loss
        loss.backward()
        return loss.detach(), model.model.language_model.layers[1].self_attn.q_proj.weight.grad

    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="triton")
    with torch.inference_mode():
        model(**inputs, execution_plan=plan)
    (loss, grad), (fresh_loss, fresh_grad) = trained(model), trained(ak.patch(copy.deepcopy(stock), "H", rank=2,
                                                                               backend="triton"))
    assert torch.equal(loss, fresh_loss) and torch.equal(grad, fresh_grad)


@interpreter
@pytest.mark.triton
def test_inputs_embeds_wider_than_the_model_are_refused_on_a_kernel_backend_naming_them():
    model = ak.patch(tiny_llava(seed=33, num_layers=4).half(), "H", rank=2, backend="triton")
    embeds = torch.randn(1, 5, 64)
    with torch.no_grad(), pytest.raises(ValueError, match=r"^inputs_embeds: torch.float32, where the model's weights "
                                                         r"are torch.float16: the triton backend's kernels"):
        model(inputs_embeds=embeds)


@interpreter
@pytest.mark.triton
def test_threads_sharing_a_model_in_the_interpreter_each_get_what_they_get_alone():
    """Triton's interpreter holds a running kernel's grid and its patched language in module-level state: threads
    sharing a model on the triton backend failed with the interpreter's errors ('x >= grid_dim[0]'). One launch at a
    time, each call gives what it gives alone."""
    model = ak.patch(tiny_llava(seed=31, num_layers=4, hidden_size=32, intermediate_size=48, num_heads=4,
                                num_kv_heads=2), "H", rank=2, backend="triton")
    inputs = example_inputs(model, text_tokens=4, seed=32)
    budgets = [0.5, 0.9, 1.0]
    with torch.no_grad():
        alone = {b: model(**inputs, latency_budget=b).logits for b in budgets}
    start, results = threading.Barrier(len(budgets)), []

    def repeat(budget):
        start.wait()
        for _ in range(2):
            try:
                with torch.no_grad():
                    results.append(torch.equal(model(**inputs, latency_budget=budget).logits, alone[budget]))
            except Exception as error:  # recorded: an error raised in a thread would not fail the test
                results.append(repr(error))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads switch within each launch
    try:
        threads = [threading.Thread(target=repeat, args=(b,)) for b in budgets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert results == [True] * 2 * len(budgets), results


@pytest.mark.triton
def test_triton_backend_lays_out_reduction_weights_once_and_unpatch_restores_them():
    stock = tiny_llava(seed=28, num_layers=2)
    model = copy.deepcopy(stock)
    ak.patch(model, "H", rank=2, backend="torch")
    o = model.model.language_model.layers[1].self_attn.o_proj.weight
    assert o.is_contiguous()  # the torch backend keeps the stock layout
    ak.patch(model, "H", rank=2, backend="triton")  # patching again with another backend switches to it
    o = model.model.language_model.layers[1].self_attn.o_proj.weight
    assert o.stride() == (1, o.shape[0])
    torch.testing.assert_close(o, stock.model.language_model.layers[1].self_attn.o_proj.weight, rtol=0, atol=0)
    ak.unpatch(model)
    for (name, a), (_, b) in zip(model.named_parameters(), stock.named_parameters()):
        assert a.is_contiguous() and torch.equal(a, b), name


def _layout(lm) -> list:
    """Per decoder layer of the language model ``lm``: whether q, k and v share one storage back to back, and o's
    and down's strides."""
    out = []
    for layer in lm.layers:
        attn = layer.self_attn
        q, k, v = (lin.weight for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
        one = (q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
               and k.storage_offset() == q.numel() and v.storage_offset() == q.numel() + k.numel())
        out.append((one, attn.o_proj.weight.stride(), layer.mlp.down_proj.weight.stride()))
    return out


def _storage_bytes(module) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in module.state_dict().values()}
               .values())


@pytest.mark.triton
@pytest.mark.parametrize("part", ["model", "language model"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_of_a_triton_patched_model_keeps_its_layout_and_size(how, part, tmp_path):
    """A copy of the model, or of its language model alone, keeps each layer's q, k and v in one tensor (one
    projection reads them) and o and down column by column, in as many bytes as the original: deepcopy copied q,
    k and v apart, and pickle wrote their whole stacked tensor once for each, so the copy held it three times."""
    import pickle
    model = ak.patch(tiny_llava(seed=28, num_layers=2), "H", rank=2, backend="triton")
    original = model if part == "model" else model.model.language_model
    if how == "deepcopy":
        copied = copy.deepcopy(original)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(original))
    else:
        torch.save(original, tmp_path / "module.pt")
        copied = torch.load(tmp_path / "module.pt", weights_only=False)
    lms = [m if part == "language model" else m.model.language_model for m in (original, copied)]
    assert _layout(lms[1]) == _layout(lms[0]) and all(one for one, *_ in _layout(lms[0]))
    assert _storage_bytes(copied) == _storage_bytes(original)
    for (name, a), (_, b) in zip(copied.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    pointers = [p.data_ptr() for p in lms[1].parameters()]
    lay_out_qkv(lms[1], stacked=True)  # already one tensor per layer: left as it is
    assert [p.data_ptr() for p in lms[1].parameters()] == pointers
