"""Training: a Gumbel-sampled plan, the masked computation, and gradients reaching the scheduler."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import adaptive_kernels as ak
from adaptive_kernels.tiny import example_inputs, tiny_llava
from adaptive_kernels.sliced import masked_stock, unit_mask_hooks
from oracles import cache_of, fed_latency_token, prompt_labels, stock_of_shape


def test_training_forward_samples_a_plan_and_trains_the_scheduler():
    stock = tiny_llava(seed=3)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2).train()
    inputs = example_inputs(stock, batch_size=2, seed=5)
    scheduler = model.model.language_model.latency_scheduler
    drawn = []
    select = scheduler.select
    scheduler.select = lambda *a, **k: drawn.append(select(*a, **k)) or drawn[-1]
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == stock.config.image_token_id, -100)

    torch.manual_seed(0)
    out = model(**inputs, labels=labels, latency_budget=[0.6, 0.8], output_hidden_states=True)
    out.loss.backward()

    layers, heads, groups = drawn[-1]
    assert heads.requires_grad and int(heads[0].sum()) == 2 * 3 and int(heads[1].sum()) == 2 * 9
    S = labels.shape[1]
    manual = F.cross_entropy(out.logits[:, :S - 1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    for p in (scheduler.head.weight, scheduler.latency_encoder.fc1.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0

    prefix = torch.ones(2, 4, dtype=torch.bool)
    plan = ak.ExecutionPlan(torch.cat([prefix, layers.detach() > 0], 1),
                            torch.cat([prefix[..., None].expand(-1, -1, 8), heads.detach() > 0], 1),
                            torch.cat([prefix[..., None].expand(-1, -1, 8), groups.detach() > 0], 1))
    oracle = masked_stock(stock, plan)
    with torch.no_grad():
        embeds, mask = fed_latency_token(model, stock, inputs, [0.6, 0.8])
        expected = oracle(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(out.logits.detach(), expected.logits, rtol=1e-4, atol=1e-5)
    assert len(out.hidden_states) == len(expected.hidden_states) == 9  # the decoder's input and its 8 layers' outputs
    for got, want in zip(out.hidden_states, expected.hidden_states):  # the sampled layers' included
        torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-5)


def test_training_with_projection_biases_is_the_masked_computation():
    """An H layer none of whose units was picked is skipped whole in training, as at inference: its o and
    down biases are not added; a layer that runs some units adds them."""
    stock = stock_of_shape(53, num_heads=4, num_kv_heads=2, hidden_size=40, head_dim=12, attention_bias=True,
                           mlp_bias=True)
    model = ak.patch(copy.deepcopy(stock), "H", rank=1).train()  # 4 layers: 2 and 3 are scheduled
    inputs = example_inputs(stock, batch_size=2, seed=3)
    layers = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    heads = torch.tensor([[[1.0, 0, 1, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 1, 0, 0]]])
    groups = torch.tensor([[[0.0, 1, 1, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [1, 0, 0, 1]]])
    model.model.language_model.latency_scheduler.select = lambda *args, **kwargs: (layers, heads, groups)
    logits = model(**inputs, latency_budget=[0.75, 0.75]).logits

    prefix = torch.ones(2, 2, 4, dtype=torch.bool)
    plan = ak.ExecutionPlan(torch.cat([prefix[..., 0], layers > 0], 1), torch.cat([prefix, heads > 0], 1),
                            torch.cat([prefix, groups > 0], 1))
    with torch.no_grad():
        embeds, mask = fed_latency_token(model, stock, inputs, [0.75, 0.75])
        expected = masked_stock(stock, plan)(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-4, atol=1e-5)


def counted(method, runs: list, i: int):
    """``method``, adding one to ``runs[i]`` per call."""
    def call(*args, **kwargs):
        runs[i] += 1
        return method(*args, **kwargs)
    return call


def enable_checkpointing(model) -> None:
    """Gradient checkpointing on: transformers 5.2x's name for it, else the older one."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


def loss_and_gradients(out, model) -> tuple:
    """After ``out.loss.backward()``: the loss and each parameter's gradient, by name."""
    return out.loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def same_loss_and_gradients(plain: tuple, checkpointed: tuple) -> None:
    """``loss_and_gradients`` of a forward without and with gradient checkpointing: the same loss, and the same
    gradients (to rounding) of the same parameters."""
    (loss, grads), (loss_checkpointed, grads_checkpointed) = plain, checkpointed
    torch.testing.assert_close(loss_checkpointed, loss, rtol=0, atol=0)
    assert grads.keys() == grads_checkpointed.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads_checkpointed[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_gradient_checkpointing_recomputes_every_layer_and_gives_the_same_loss_and_gradients():
    """Recomputing layers in the backward pass (gradient checkpointing) changes memory, not results; the
    scheduled layers of budget training (forward_masked) are recomputed too, as transformers does forward."""
    stock = tiny_llava(seed=3)
    inputs = example_inputs(stock, batch_size=2, seed=6)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == stock.config.image_token_id, -100)
    plan = ak.plan(ak.patch(copy.deepcopy(stock), "H", rank=2), latency_budget=[0.6, 0.9], **inputs)
    num_layers = stock.config.text_config.num_hidden_layers
    prefix = num_layers // 2  # patch's default number of always-on layers
    for given in ({"execution_plan": plan}, {"latency_budget": [0.6, 0.9]}):
        results = []
        for checkpointed in (False, True):
            model = ak.patch(copy.deepcopy(stock), "H", rank=2).train()
            if checkpointed:
                enable_checkpointing(model)
            runs = [0] * num_layers  # runs of each layer's forward_masked (the scheduled layers in budget training)
            for i, layer in enumerate(model.model.language_model.layers):
                layer.forward_masked = counted(layer.forward_masked, runs, i)
            torch.manual_seed(0)  # the same Gumbel draws
            out = model(**inputs, labels=labels, **given)
            forward_runs = list(runs)
            out.loss.backward()
            recomputed = [after - before for after, before in zip(runs, forward_runs)]
            assert recomputed == (forward_runs if checkpointed else [0] * num_layers), (given.keys(), checkpointed)
            if "latency_budget" in given:
                assert forward_runs == [0] * prefix + [1] * (num_layers - prefix)
            results.append(loss_and_gradients(out, model))
        same_loss_and_gradients(*results)


def test_gradient_checkpointing_keeps_no_cache_and_trains_long_prompts_as_without_it():
    """A training forward with gradient checkpointing (a given plan, or none) returns no cache, as stock does,
    since a layer recomputed in the backward pass would append its keys again; a prompt of more than half the
    cache's first capacity (76 tokens: its recomputed keys would not fit) gives the loss and gradients of the
    forward without checkpointing."""
    stock = tiny_llava(seed=5, num_layers=4)
    inputs = example_inputs(stock, batch_size=2, text_tokens=60, seed=9, pad=[0, 5])
    labels = prompt_labels(inputs)
    plan = ak.ExecutionPlan.full(2, 4, 8)
    plan.heads[:, 3, ::3] = plan.groups[:, 2, 1::2] = False
    for given in ({}, {"execution_plan": plan}):
        results = []
        for checkpointed in (False, True):
            model = ak.patch(copy.deepcopy(stock), "H", rank=2).train()
            if checkpointed:
                enable_checkpointing(model)
            out = model(**inputs, labels=labels, use_cache=True, **given)
            if checkpointed:
                assert cache_of(out) is None, given.keys()
            out.loss.backward()
            results.append(loss_and_gradients(out, model))
        same_loss_and_gradients(*results)


@pytest.mark.parametrize("biases", [False, True], ids=["no biases", "biases"])
@pytest.mark.parametrize("variant", ["L", "H"])
def test_mask_gradients_are_those_of_the_masked_computation(variant, biases):
    """The straight-through gradients that train the scheduler: L's layer mask multiplies the whole layer
    update, o and down biases included (a skipped layer's mask still learns what the layer was worth), H's
    head and group masks their units (also in layers none of whose units was picked), as a stock model with
    differentiable masks has them. In H the biases follow whether the layer runs, not differentiably: H's
    layer mask gets no gradient."""
    stock = stock_of_shape(53, num_heads=4, num_kv_heads=2, hidden_size=40, head_dim=12, attention_bias=True,
                           mlp_bias=True) if biases else tiny_llava(seed=6)
    L, H = stock.config.text_config.num_hidden_layers, stock.config.text_config.num_attention_heads
    P = L // 2
    model = ak.patch(copy.deepcopy(stock), variant, rank=1).train()
    inputs = example_inputs(stock, batch_size=2, seed=7)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == stock.config.image_token_id, -100)
    g = torch.Generator().manual_seed(8)
    layers = (torch.rand(2, L - P, generator=g) < 0.5).float()
    layers[:, 0], layers[:, 1] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # each row skips one, runs one
    if variant == "L":
        heads = groups = layers[..., None].expand(-1, -1, H)
    else:
        heads, groups = ((torch.rand(2, L - P, H, generator=g) < 0.5).float() * layers[..., None] for _ in range(2))
    picked = [t.clone().requires_grad_() for t in (layers, heads, groups)]
    model.model.language_model.latency_scheduler.select = lambda *args, **kwargs: tuple(picked)
    out = model(**inputs, labels=labels, latency_budget=[0.6, 0.8])
    out.loss.backward()

    prefix = torch.ones(2, P)
    ones = torch.ones(2, L, H)
    runs = torch.cat([prefix, layers], 1)
    masks = [runs if variant == "L" else torch.ones(2, L),
             ones if variant == "L" else torch.cat([prefix[..., None].expand(-1, -1, H), heads], 1),
             ones if variant == "L" else torch.cat([prefix[..., None].expand(-1, -1, H), groups], 1)]
    masks = [m.clone().requires_grad_() for m in masks]
    reference = copy.deepcopy(stock).train()
    unit_mask_hooks(reference, *masks)  # float masks: differentiable
    if variant == "H" and biases:  # a skipped layer adds no o and down biases
        for l, layer in enumerate(reference.model.language_model.layers):
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                off = (1 - runs[:, l])[:, None, None]
                linear.register_forward_hook(lambda module, args, output, off=off: output - off * module.bias)
    with torch.no_grad():
        embeds, mask = fed_latency_token(model, stock, inputs, [0.6, 0.8])
    logits = reference(inputs_embeds=embeds, attention_mask=mask).logits
    S = labels.shape[1]
    loss = F.cross_entropy(logits[:, :S - 1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    if variant == "L":
        torch.testing.assert_close(picked[0].grad, masks[0].grad[:, P:], rtol=1e-4, atol=1e-7)
        assert bool((picked[0].grad[layers == 0] != 0).all())  # skipped layers learn too
    else:
        assert picked[0].grad is None or not picked[0].grad.any()
        for ours, theirs in zip(picked[1:], masks[1:]):
            torch.testing.assert_close(ours.grad, theirs.grad[:, P:], rtol=1e-4, atol=1e-7)
        assert bool((picked[1].grad[layers == 0] != 0).any())


@pytest.mark.parametrize("given", ["budget", "plan", "none"])
def test_generate_in_train_mode_is_inference(given):
    """generate runs without autograd: in train mode, gradient checkpointing on, it keeps its cache and
    makes its plan with the scheduler's top-n, giving the ids of eval mode (with no plan, stock's in eval
    mode; stock transformers 5.17 itself drops its cache in train mode with checkpointing)."""
    stock = tiny_llava(seed=4)
    inputs = example_inputs(stock, batch_size=2, seed=9)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    kwargs = {"budget": {"latency_budget": [0.6, 0.8]}, "none": {},
              "plan": {"execution_plan": ak.plan(model, latency_budget=[0.7, 0.9], **inputs)}}[given]
    settings = {"max_new_tokens": 5, "do_sample": False}
    expected = model.generate(**inputs, **kwargs, **settings)
    if given == "none":
        assert torch.equal(expected, stock.generate(**inputs, **settings))
    model.train()
    enable_checkpointing(model)
    assert torch.equal(model.generate(**inputs, **kwargs, **settings), expected)


def test_training_with_attention_dropout_is_refused():
    """The kernels apply no attention dropout: training with one is refused, not silently run without it."""
    stock = tiny_llava(seed=4)
    stock.config.text_config.attention_dropout = 0.1
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    inputs = example_inputs(stock, batch_size=1, seed=10)
    with torch.no_grad():
        expected = model(**inputs, latency_budget=0.6).logits  # inference: no dropout anywhere
    model.train()
    with pytest.raises(ValueError, match="attention_dropout is 0.1"):
        model(**inputs, latency_budget=0.6, labels=inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**inputs, latency_budget=0.6).logits, expected)


def test_plan_in_train_mode_is_the_eval_mode_plan_and_runs_without_autograd():
    """ak.plan only plans: in train mode, with autograd on, it picks the scheduler's top-n (no Gumbel draw) as
    in eval mode, and runs without autograd, so an attention dropout that training refuses does not stop it."""
    stock = tiny_llava(seed=4)
    stock.config.text_config.attention_dropout = 0.1
    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    inputs = example_inputs(stock, batch_size=2, seed=11)
    budgets = [0.6, 0.8]
    expected = ak.plan(model, latency_budget=budgets, **inputs)
    model.train()
    assert torch.is_grad_enabled()
    for _ in range(2):
        assert ak.plan(model, latency_budget=budgets, **inputs) == expected


@pytest.mark.parametrize("frozen", ["q_proj", "k_proj"])
def test_a_frozen_projection_leaves_the_others_their_gradients(frozen):
    """With one of q, k, v frozen the other two still train (they are read apart, not as one stacked
    weight): every gradient as the stock model's, with every unit on and under a plan."""
    stock = tiny_llava(seed=8)
    inputs = example_inputs(stock, batch_size=2, seed=9, pad=[0, 3])
    labels = inputs["input_ids"]
    plan = ak.ExecutionPlan.full(2, 8, 8)
    plan.heads[:, 6, ::3] = False
    for request in ({}, {"execution_plan": plan}):
        grads = []
        for model in (masked_stock(copy.deepcopy(stock), plan) if request else copy.deepcopy(stock),
                      ak.patch(copy.deepcopy(stock), "H", rank=2)):
            for layer in model.model.language_model.layers:
                layer.self_attn.get_submodule(frozen).weight.requires_grad_(False)
            model.train()(**inputs, labels=labels, **request).loss.backward()
            grads.append({(l, name): getattr(layer.self_attn, name).weight.grad
                          for l, layer in enumerate(model.model.language_model.layers)
                          for name in ("q_proj", "k_proj", "v_proj")})
        for (l, name), want in grads[0].items():
            got = grads[1][l, name]
            assert (got is None) == (want is None) == (name == frozen), (l, name)
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.triton
def test_a_kernel_backend_trains_under_autocast_with_its_decoder_in_the_models_dtype():
    """torch.autocast (bfloat16 on the CPU) over a float32 model, as mixed-precision training runs it, with a
    dense layer in the plan (products by F.linear, which autocast casts): the triton backend runs the decoder
    in float32, autocast off there, and gives the masked stock model run so (vision tower, projector and
    lm_head under autocast): the loss, the decoder's last hidden state and every parameter's gradient both
    models name alike."""
    stock = tiny_llava(seed=11, num_layers=3)
    g = torch.Generator().manual_seed(12)
    heads, groups = torch.rand(2, 3, 8, generator=g) < 0.6, torch.rand(2, 3, 8, generator=g) < 0.6
    heads[:, 0], groups[:, 0] = True, True
    plan = ak.ExecutionPlan(torch.ones(2, 3, dtype=torch.bool), heads, groups)
    model = ak.patch(copy.deepcopy(stock), "H", rank=2, backend="triton").train()
    oracle = masked_stock(stock, plan).train()
    decoder = oracle.model.language_model
    decoder.forward = torch.autocast("cpu", enabled=False)(decoder.forward)
    inputs = example_inputs(stock, batch_size=2, seed=13)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == stock.config.image_token_id, -100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model(**inputs, labels=labels, execution_plan=plan, output_hidden_states=True)
        theirs = oracle(**inputs, labels=labels, output_hidden_states=True)
    ours.loss.backward()
    theirs.loss.backward()
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    assert ours.hidden_states[-1].dtype == torch.float32
    torch.testing.assert_close(ours.hidden_states[-1], theirs.hidden_states[-1], rtol=1e-4, atol=1e-5)
    named = dict(oracle.named_parameters())
    compared = [(name, name.rsplit(".", 1)[0], p.grad, named[name].grad) for name, p in model.named_parameters()
                if name in named and (p.grad is not None or named[name].grad is not None)]
    assert any(".mlp.down_proj." in name for name, *_ in compared)  # decoder weights among them
    module_largest = {}  # per module, its largest gradient: a key bias's is 0 but for rounding, its weight's not
    for _, module, _, want in compared:
        module_largest[module] = max(module_largest.get(module, 0.0), want.abs().max().item())
    for name, module, got, want in compared:  # of that: 1e-4 in the float32 decoder (its gradients come through
        # lm_head's bfloat16 product), a few bfloat16 roundings in the parts autocast runs in bfloat16 (3/4 of one
        # was seen on the vision tower's, over 14 seeds)
        share = 1e-4 if ".language_model." in name else 4 * torch.finfo(torch.bfloat16).eps
        torch.testing.assert_close(got, want, rtol=0, atol=share * module_largest[module] + 1e-12,
                                   msg=lambda message: f"{name}: {message}")


def test_a_layer_no_row_runs_gets_no_gradient_and_the_rest_the_masked_computations():
    """Under a plan, layer 5 (skipped by both rows) is not called: its parameters' gradients stay None, where
    the masked computation's are zeros; layer 6 (skipped by one row) and every other parameter get the masked
    computation's gradients."""
    stock = tiny_llava(seed=21)
    inputs = example_inputs(stock, batch_size=2, seed=22)
    layers = torch.ones(2, 8, dtype=torch.bool)
    layers[:, 5], layers[0, 6] = False, False
    heads = layers[..., None].expand(2, 8, 8).clone()
    plan = ak.ExecutionPlan(layers, heads, heads.clone())
    model, oracle = ak.patch(copy.deepcopy(stock), "L").train(), masked_stock(stock, plan).train()
    labels = inputs["input_ids"]
    model(**inputs, labels=labels, execution_plan=plan).loss.backward()
    oracle(**inputs, labels=labels).loss.backward()
    named = dict(oracle.named_parameters())
    for name, p in model.named_parameters():
        if name not in named:  # the scheduler's, which a given plan does not use
            assert p.grad is None, name
        elif ".layers.5." in name:
            assert p.grad is None and bool((named[name].grad == 0).all()), name
        elif named[name].grad is None:  # the vision tower's last layer, whose output LLaVA does not read
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, named[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert model.model.language_model.layers[6].mlp.down_proj.weight.grad.abs().sum() > 0


def test_trainer_checkpoints_and_resumes_as_the_readme_says(tmp_path):
    """Hugging Face Trainer trains a patched model on batches carrying one budget per row (its column pruning
    keeps latency_budget: forward names it) and saves checkpoints of the stock weights with the scheduler file
    beside them; README's resume (the stock class from the folder, patch with its scheduler file, then
    resume_from_checkpoint) ends where the uninterrupted run ends, every parameter exactly."""
    pytest.importorskip("accelerate")  # Trainer needs it
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration, Trainer, TrainingArguments

    from adaptive_kernels.models.llava import SCHEDULER_FILE

    stock = tiny_llava(seed=8, num_layers=4)
    rows = []
    for i, budget in enumerate([0.6, 0.8, 1.0, 0.7] * 2):
        inputs = example_inputs(stock, seed=20 + i)
        rows.append({**{k: v[0] for k, v in inputs.items()}, "labels": prompt_labels(inputs)[0],
                     "latency_budget": budget})

    def collate(batch):
        return {k: torch.tensor([row[k] for row in batch]) if k == "latency_budget" else
                torch.stack([row[k] for row in batch]) for k in batch[0]}

    def train(model, folder, **resume):
        arguments = TrainingArguments(output_dir=str(tmp_path / folder), max_steps=4, save_steps=2,
                                      per_device_train_batch_size=2, learning_rate=1e-3, lr_scheduler_type="constant",
                                      use_cpu=True, report_to="none", seed=0, disable_tqdm=True)
        Trainer(model=model, args=arguments, train_dataset=rows, data_collator=collate).train(**resume)
        return dict(model.named_parameters())

    model = ak.patch(copy.deepcopy(stock), "H", rank=2)
    untrained = model.model.language_model.latency_scheduler.head.weight.detach().clone()
    whole = train(model, "whole")
    assert not torch.equal(untrained, model.model.language_model.latency_scheduler.head.weight)  # budgets reached it
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    with safe_open(checkpoint / "model.safetensors", "pt") as weights:
        assert not any("latency_scheduler" in key for key in weights.keys())
    resumed = ak.patch(LlavaForConditionalGeneration.from_pretrained(checkpoint), "H", rank=2,
                       scheduler=checkpoint / SCHEDULER_FILE)
    resumed = train(resumed, "resumed", resume_from_checkpoint=str(checkpoint))
    assert resumed.keys() == whole.keys() and any("latency_scheduler" in name for name in whole)
    for name, parameter in whole.items():
        assert torch.equal(resumed[name], parameter), name
