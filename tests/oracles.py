"""The tests' references and recorders: stock transformers step by step and at Llama shapes beside
tiny_llava's (the stock models of a plan itself, masked and sliced, are in adaptive_kernels.sliced, which
uses none of the executor's code), dispatch modes that record the ops a call runs, and one that stands in for a
CUDA graph on the CPU."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves
from transformers import LlamaModel, LlavaForConditionalGeneration

import adaptive_kernels as ak
from adaptive_kernels.models.llava import prompt_embeddings
from adaptive_kernels.tiny import tiny_llava_config

CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_of(output):
    """The cache a model output returns (``cache`` in newer transformers, ``past_key_values`` before), or None
    where it returns none (a ModelOutput leaves out fields that are None)."""
    return output.get("past_key_values", output.get("cache"))


def prompt_labels(inputs: dict) -> torch.Tensor:
    """Training labels that are the prompt itself, its padding (attention mask 0) ignored as -100: [B, S]."""
    return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)


def fed_latency_token(model, stock, inputs: dict, budgets) -> tuple[torch.Tensor, torch.Tensor]:
    """What a stock model is fed for a request of the patched ``model`` under ``budgets`` (one per row): the
    prompt's embeddings then the latency token -> embeds [B, S + 1, D], and the attention mask with that last
    position visible [B, S + 1]."""
    token = torch.stack([ak.latency_embedding(model, b) for b in budgets])
    embeds = torch.cat([prompt_embeddings(stock, inputs), token[:, None]], 1)
    return embeds, F.pad(inputs["attention_mask"], (0, 1), value=1)


def stock_decode_logits(model, embeds, attention_mask, position_ids, new_tokens) -> list[torch.Tensor]:
    """Logits of a stock LLaVA's language model fed ``embeds`` then ``new_tokens`` one at a time.

    Returns [prefill logits [B, S, V], then [B, V] after each new token but the last].
    """
    from transformers import DynamicCache

    lm = model.model.language_model
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        out = lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                 **{CACHE_KWARG: cache})
        steps = [model.lm_head(out.last_hidden_state)]
        mask, pos = attention_mask, position_ids[:, -1:]
        for token in new_tokens[:, :-1].T:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos + 1
            out = lm(inputs_embeds=lm.embed_tokens(token[:, None]), attention_mask=mask, position_ids=pos,
                     use_cache=True, **{CACHE_KWARG: cache})
            steps.append(model.lm_head(out.last_hidden_state[:, -1]))
    return steps


def stock_of_shape(seed: int, num_heads: int, num_kv_heads: int, hidden_size: int, head_dim: int | None = None,
                   attention_bias: bool = False, mlp_bias: bool = False):
    """A random 4-layer LLaVA whose decoder has these sizes (MLP of 45 neurons); its projection biases,
    where it has them, are drawn at random (transformers initialises them to 0)."""
    config = tiny_llava_config(num_layers=4, intermediate_size=45, num_heads=num_heads, num_kv_heads=num_kv_heads,
                               hidden_size=hidden_size)
    text = config.text_config
    text.head_dim, text.attention_bias, text.mlp_bias = head_dim or hidden_size // num_heads, attention_bias, mlp_bias
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        stock = LlavaForConditionalGeneration(config).eval()
        for name, bias in stock.model.language_model.named_parameters():
            if name.endswith(".bias"):
                torch.nn.init.normal_(bias.data, std=0.5)
    return stock


class WeightCopies(TorchDispatchMode):
    """While on, records in ``copies`` every op that reads the storage of one of ``weights`` other than a view
    or a product (``READS``): gathers, clones, casts, masks, concatenations."""

    READS = {"aten::t", "aten::transpose", "aten::view", "aten::_unsafe_view", "aten::slice", "aten::select",
             "aten::alias", "aten::as_strided", "aten::expand", "aten::permute", "aten::detach", "aten::mm",
             "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}

    def __init__(self, weights):
        super().__init__()
        self.storages = {w.untyped_storage().data_ptr() for w in weights}
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        reads_weight = any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages
                           for t in tree_leaves((args, kwargs)))
        if reads_weight and func._schema.name not in self.READS:
            self.copies.append(func._schema.name)
        return func(*args, **(kwargs or {}))


class DispatchedOps(TorchDispatchMode):
    """While on, records in ``seen`` the name of every op dispatched (``"aten.copy_.default"``, say)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class CpuGraph(TorchDispatchMode):
    """A CUDA graph's semantics on the CPU: while ``capture()`` lasts, the package takes its capture path (its
    ``capturing`` is True) and every aten op is recorded with the tensors it read and wrote; ``replay()`` runs the
    ops again on those tensors and copies what they return into the tensors the capture returned. As in a CUDA
    graph, Python ran once, at capture: its decisions and host values stay as they were then."""

    MODULES = ("adaptive_kernels.cache", "adaptive_kernels.graphs", "adaptive_kernels.plan",
               "adaptive_kernels.scheduler", "adaptive_kernels.models.llama")

    def __init__(self, monkeypatch):
        super().__init__()
        self.ops, self.monkeypatch = [], monkeypatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("a value read back to the host inside the capture")
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args, kwargs or {}, out))
        return out

    @contextlib.contextmanager
    def capture(self):
        with self.monkeypatch.context() as patched:
            for name in self.MODULES:
                patched.setattr(importlib.import_module(name), "capturing", lambda on: True)
            with self:
                yield

    def replay(self):
        with torch.inference_mode():  # a CUDA graph replays kernels, which no autograd or inference-mode rule sees
            for func, args, kwargs, out in self.ops:
                again = func(*args, **kwargs)
                for new, old in zip(tree_flatten(again)[0], tree_flatten(out)[0]):
                    if isinstance(old, torch.Tensor) and new is not old:
                        old.copy_(new)


def replaying_decode_steps(model):
    """``model`` (patched), its backend made to replay one-token decode steps as CUDA graphs, as the kernel backends
    do: the torch backend's, on the CPU's stand-in for a graph (``cpu_decode_graphs``)."""
    settings = model.model.language_model._ak_settings
    settings.backend = dataclasses.replace(settings.backend, replays_decode=True)
    return model


def cpu_decode_graphs(monkeypatch) -> None:
    """The package's own decode graphs (``graphs.DecodeGraph``) made on the CPU: CUDA graphs made and captured as
    ``CpuGraph``s, and work on CPU tensors counted as capturable."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: CpuGraph(monkeypatch))
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, **options: graph.capture())
    monkeypatch.setattr(importlib.import_module("adaptive_kernels.models.llama"), "capturable", lambda x: True)
