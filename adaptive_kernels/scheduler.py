"""The AdaLLaVA scheduler: latency encoder, scheduler head, and plan sampling.

The latency encoder turns a budget into the latency token's input embedding. After the prefix
layers the scheduler head reads that token's hidden state and scores every schedulable unit;
sampling keeps exactly the budget's number of units: Gumbel top-n with straight-through
gradients in training, deterministic top-n at inference.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ArgumentTypeError
from .graphs import capturing
from .plan import UnitSpace

NUM_FREQUENCIES = 128
GUMBEL_TEMPERATURE = 5.0


def fourier_features(q: torch.Tensor) -> torch.Tensor:
    """``[sin(2 pi q f), cos(2 pi q f)]`` for the frequencies ``f = 10000^(-i/F)``, i < F = NUM_FREQUENCIES,
    computed in float64: [B] -> [B, 2F]."""
    i = torch.arange(NUM_FREQUENCIES, dtype=torch.float64, device=q.device)
    freqs = 1.0 / 10000 ** (i / NUM_FREQUENCIES)
    angles = (2 * math.pi * q.double())[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class LatencyEncoder(nn.Module):
    """``q -> fourier_features -> LayerNorm -> Linear -> GELU -> Linear``: [B] -> [B, hidden]."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(2 * NUM_FREQUENCIES)
        self.fc1 = nn.Linear(2 * NUM_FREQUENCIES, hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.embed(fourier_features(q).to(self.fc1.weight.dtype))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The layers after the features: [B, 2F] in the weights' dtype -> [B, hidden]."""
        return self.fc2(self.act(self.fc1(self.norm(features))))


def _ranks(logits: torch.Tensor) -> torch.Tensor:
    """Position of each entry along the last axis when sorted by descending logit, ties broken by index
    (NaN counts as +inf); same shape, int64."""
    order = torch.argsort(-logits.nan_to_num(nan=torch.inf, posinf=torch.inf, neginf=-torch.inf), dim=-1, stable=True)
    return order.argsort(dim=-1)  # the inverse permutation


def _per_row(values: list[int], like: torch.Tensor) -> torch.Tensor:
    """``values`` as int64 [B] on ``like``'s device; while a CUDA graph is captured, written by fills
    rather than copied from the host (a capture cannot record a copy from pageable memory)."""
    if len(set(values)) <= 1:
        return torch.full((len(values),), values[0] if values else 0, dtype=torch.int64, device=like.device)
    if not capturing(like):
        return torch.tensor(values, dtype=torch.int64, device=like.device)
    out = torch.empty(len(values), dtype=torch.int64, device=like.device)
    for i, v in enumerate(values):
        out[i].fill_(v)  # a fill kernel holding v; out[i] = v would copy a host scalar
    return out


def gumbel_pick(logits: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """One Gumbel-softmax draw (temperature ``GUMBEL_TEMPERATURE``) among ``available`` entries, as a
    straight-through one-hot.

    logits [..., N] float; available bool [..., N] -> [..., N] whose value is a hard one-hot and
    whose gradient is that of the soft sample; a row with nothing available gives zeros (no NaN
    from a softmax over nothing, in the value or the gradient).
    """
    some = available.any(-1, keepdim=True)
    u = torch.rand_like(logits, dtype=torch.float32).clamp(1e-20, 1.0)
    noisy = (logits.float() - torch.log(-torch.log(u))) / GUMBEL_TEMPERATURE
    soft = torch.softmax(noisy.masked_fill(~(available | ~some), float("-inf")), dim=-1) * some
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0) * some
    return (hard - soft.detach() + soft).to(logits.dtype)


class AdaptiveScheduler(nn.Module):
    """Latency encoder plus ``Linear(hidden, K')`` scoring the units of the K = L - P scheduled layers.

    Variant L: K' = K layer logits. Variant H: per scheduled layer one layer logit, H head logits
    and G = H group logits, K' = K * (1 + 2H).
    """

    def __init__(self, units: UnitSpace, hidden_size: int):
        super().__init__()
        self.units = units
        self.num_scheduled = units.num_layers - units.num_prefix_layers
        per_layer = 1 if units.variant == "L" else 1 + 2 * units.num_heads
        self.latency_encoder = LatencyEncoder(hidden_size)
        self.head = nn.Linear(hidden_size, self.num_scheduled * per_layer)
        self._features = {}  # latency_embedding's: (quantised budget, device, dtype) -> features [2F]

    def latency_embedding(self, budgets: list[float]) -> torch.Tensor:
        """The latency token's input embedding per budget: [B, hidden].

        Each quantised budget's embedding is computed once, alone, so a row's is the one ``[budget]`` alone gives,
        bit for bit, whatever the other rows' budgets (a batched product may round otherwise). Its Fourier features
        (they hold no weight) are computed once per quantised budget, device and dtype, from a fill rather than a
        host copy, and kept: a request launches the encoder's layers only, on the weights they hold now, and may be
        captured in a CUDA graph.
        """
        weight = self.latency_encoder.fc1.weight
        keys = [(self.units.quantised(b), weight.device, weight.dtype) for b in budgets]
        embeddings = {}
        for key in dict.fromkeys(keys):
            features = self._features.get(key)
            if features is None:
                with torch.inference_mode(False):  # kept for later requests, which may save it for backward
                    q = torch.full((1,), key[0], dtype=torch.float64, device=weight.device)
                    features = fourier_features(q)[0].to(weight.dtype)
                if not capturing(weight):  # a capture's tensors hold nothing until it is replayed
                    self._features[key] = features
            embeddings[key] = self.latency_encoder.embed(features[None])
        return torch.cat([embeddings[key] for key in keys])

    def select(self, latency_state: torch.Tensor, budgets: list[float], sample: bool = False):
        """Units after the prefix from the latency token's hidden state [B, hidden].

        Returns (layers [B, K], heads [B, K, H], groups [B, K, H]) for the K scheduled layers on the
        state's device: bool masks of the top-n units (``sample=False``; nothing is read back to the
        host, so this may run inside CUDA-graph capture), or float straight-through masks of a Gumbel
        top-n draw (``sample=True``). Either way each row has exactly its budget's units.
        """
        logits = self.head(latency_state)
        counts = _per_row([self.units.scheduled_units(b) for b in budgets], logits)
        if not sample:
            return self._top_n(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)), counts)
        if self.units.variant == "L":
            return _whole_layers(_gumbel_top_n(logits, counts), self.units.num_heads)
        layer_logits, head_logits, group_logits = self._per_layer(logits)
        return _gumbel_top_n_units(layer_logits, head_logits, group_logits, counts, self.units.rank)

    def _per_layer(self, logits):
        """Variant H's logits [B, K * (1 + 2H)] as (layer [B, K], head [B, K, H], group [B, K, H]) logits."""
        H = self.units.num_heads
        logits = logits.reshape(-1, self.num_scheduled, 1 + 2 * H)
        return logits[..., 0], logits[..., 1:1 + H], logits[..., 1 + H:]

    def _top_n(self, logits: torch.Tensor, counts: torch.Tensor):
        """Deterministic top-n: float logits [B, K'] and units per row [B] -> bool masks (layers [B, K],
        heads [B, K, H], groups [B, K, H]) on the logits' device."""
        K, H, r = self.num_scheduled, self.units.num_heads, self.units.rank
        if self.units.variant == "L":
            return _whole_layers(_ranks(logits) < counts[:, None], H)
        layer_logits, head_logits, group_logits = self._per_layer(logits)
        # Deterministic rounds always pick the best layer that still has room, so layers fill in
        # logit order, H/r units each; inside a layer the best r*u heads and groups are on.
        capacity = H // r
        by_order = (counts[:, None] - capacity * torch.arange(K, device=logits.device)).clamp(0, capacity)
        units_in_layer = by_order.gather(1, _ranks(layer_logits))  # the k-th best layer gets by_order[:, k]
        on = units_in_layer[..., None] * r
        head_ranks, group_ranks = _ranks(torch.stack([head_logits, group_logits]))  # one sort for both
        return units_in_layer > 0, head_ranks < on, group_ranks < on


def _whole_layers(layers: torch.Tensor, num_heads: int) -> tuple:
    """Variant L's masks from its layer mask [B, K]: (layers, heads, groups), every head and group of a
    chosen layer on."""
    heads = layers[..., None].expand(-1, -1, num_heads)
    return layers, heads, heads


def _gumbel_top_n(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Sum of n straight-through Gumbel picks without replacement per row: [B, N] float."""
    picked = torch.zeros_like(logits)
    for step in range(int(counts.max()) if counts.numel() else 0):
        active = (step < counts)[:, None]
        one_hot = gumbel_pick(logits, picked.detach() == 0)
        picked = picked + one_hot * active
    return picked


def _gumbel_top_n_units(layer_logits, head_logits, group_logits, counts, rank):
    """Variant H: each round picks a layer with room, then ``rank`` new heads and groups in it."""
    B, K, H = head_logits.shape
    layers = torch.zeros_like(layer_logits)
    heads = torch.zeros_like(head_logits)
    groups = torch.zeros_like(group_logits)
    for step in range(int(counts.max()) if counts.numel() else 0):
        active = (step < counts)[:, None]
        room = heads.detach().sum(-1) < H
        layer = gumbel_pick(layer_logits, room) * active
        chosen = layer.detach().argmax(-1)
        for masks, logits in ((heads, head_logits), (groups, group_logits)):
            row_logits = logits[torch.arange(B), chosen]
            taken = masks.detach()[torch.arange(B), chosen] > 0
            for _ in range(rank):
                one_hot = gumbel_pick(row_logits, ~taken)
                masks += layer[..., None] * one_hot[:, None, :]
                taken = taken | (one_hot.detach() > 0)
        layers = torch.maximum(layers, layer)
    return layers, heads, groups


def _setting(scheduler: AdaptiveScheduler) -> dict[str, str]:
    """What a scheduler's weights fit, as safetensors metadata: the unit space (rank for variant H
    only, where it matters) and the hidden size."""
    u = scheduler.units
    setting = {"variant": u.variant, "num_layers": str(u.num_layers), "num_prefix_layers": str(u.num_prefix_layers),
               "num_heads": str(u.num_heads), "hidden_size": str(scheduler.head.in_features)}
    if u.variant == "H":
        setting["rank"] = str(u.rank)
    return setting


def _check_path(path, argument: str) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"{argument} must be a file path (str or os.PathLike), got {type(path).__name__}")


def save_scheduler_weights(scheduler: AdaptiveScheduler, path) -> None:
    """Write the latency encoder and scheduler head as safetensors, with the unit space as metadata; a path
    that cannot be written (a folder, a missing folder) is a ``ValueError`` naming ``path``."""
    from safetensors import SafetensorError

    _check_path(path, "path")
    tensors = {k: v.detach().contiguous().cpu() for k, v in scheduler.state_dict().items()}
    try:
        save_file(tensors, str(path), metadata=_setting(scheduler))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"path={path!s} cannot be written as a file ({error})") from error


def saved_setting(path) -> dict[str, str]:
    """The setting (variant, num_layers, num_prefix_layers, num_heads, hidden_size, and rank for variant H)
    that ``save_scheduler_weights`` recorded in the file at ``path``, as strings; empty for a safetensors file
    without it. A missing or unreadable file is a ``ValueError`` naming ``scheduler``."""
    from safetensors import SafetensorError, safe_open

    _check_path(path, "scheduler")
    if not Path(path).is_file():
        raise ValueError(f"scheduler: no file at {path!s} (give a file written by adaptive_kernels.save_scheduler)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"scheduler={path!s} is not a safetensors file written by save_scheduler ({error})") from error


def load_scheduler_weights(scheduler: AdaptiveScheduler, path) -> None:
    """Load weights saved by ``save_scheduler_weights``; a missing or unreadable file, one for another
    unit space, or one whose values are not floating point or not finite in the model's dtype, is a ``ValueError``
    naming ``scheduler``."""
    meta = saved_setting(path)
    expected = _setting(scheduler)
    if not expected.keys() & meta.keys():
        raise ValueError(f"scheduler={path!s} holds none of the setting save_scheduler writes beside the weights "
                         f"({', '.join(expected)}): give a file written by adaptive_kernels.save_scheduler")
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: file {a} vs model {b}" if a is not None else f"{k}: missing from the file, model {b}"
                           for k, (a, b) in wrong.items())
        raise ValueError(f"scheduler={path!s} was saved for another setting ({detail})")
    state = load_file(str(path), device=str(scheduler.head.weight.device))
    own = scheduler.state_dict()
    wrong = sorted(k for k in state.keys() | own.keys() if k not in state or k not in own or state[k].shape != own[k].shape)
    if wrong:
        raise ValueError(f"scheduler={path!s} does not hold this scheduler's tensors (missing, unexpected or of "
                         f"another shape: {', '.join(wrong)})")
    not_float = sorted(f"{k} ({v.dtype})" for k, v in state.items() if not v.is_floating_point())
    if not_float:
        raise ValueError(f"scheduler={path!s} holds tensors that are not floating point: {', '.join(not_float)}")
    state = {k: v.to(scheduler.head.weight.dtype) for k, v in state.items()}
    broken = sorted(k for k, v in state.items() if not v.isfinite().all())
    if broken:
        raise ValueError(f"scheduler={path!s} holds values that are not finite in {scheduler.head.weight.dtype} "
                         f"(NaN, or too large for it): {', '.join(broken)}")
    scheduler.load_state_dict(state)


def seeded_scheduler(units: UnitSpace, hidden_size: int) -> AdaptiveScheduler:
    """A scheduler with a deterministic initialisation (seed 0) that leaves the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AdaptiveScheduler(units, hidden_size)
