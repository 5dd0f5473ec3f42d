"""Execution plans and the budget arithmetic of AdaLLaVA; no model code.

An ``ExecutionPlan`` says, per batch row, which decoder layers, attention heads and MLP neuron
groups run. Budgets turn into whole schedulable units exactly as ADALLAVA.md defines:
``units = max(0, floor(T * b) - P)`` with T the units of the whole decoder and P those of the
always-on prefix. The product is floored with a margin far above float error and far below a unit,
so that a budget on a bin edge lands on it (in floats, 200 * 0.57 gives 113.99999999999999).

A plan also compiles into the index buffers the kernels read: per-request index lists built on the host
(``listed_schedule``), or fixed-width buffers built on the plan's device with nothing read back
(``compact_plan``, ``fixed_width_schedule``).
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .errors import ArgumentTypeError, refusal
from .graphs import capturing

VARIANTS = ("L", "H")
PAPER_RANK = 8  # the paper's H rank, meant for 32-head (7B) decoders: 4 units per layer
EDGE_MARGIN = 1e-9  # units: float error in T*b is about 1e-12 at T = 10^4; a unit is 1


@dataclass(frozen=True)
class UnitSpace:
    """The schedulable units of one decoder under one variant.

    ``total`` is T (units in the whole decoder), ``prefix`` is P (units in the always-on prefix
    layers); variant L counts layers, variant H counts rank-sized head-and-group units.
    """

    variant: str
    num_layers: int
    num_prefix_layers: int
    num_heads: int
    rank: int

    @property
    def units_per_layer(self) -> int:
        return 1 if self.variant == "L" else self.num_heads // self.rank

    @property
    def total(self) -> int:
        return self.num_layers * self.units_per_layer

    @property
    def prefix(self) -> int:
        return self.num_prefix_layers * self.units_per_layer

    def scheduled_units(self, budget: float) -> int:
        """Units scheduled after the prefix for one budget: ``max(0, floor(T*b) - P)``, a bin edge
        counting as reached (0.57 of 200 units is 114; 4/7 of 7 is 4)."""
        return max(0, math.floor(self.total * budget + EDGE_MARGIN) - self.prefix)

    def quantised(self, budget: float) -> float:
        """The latency encoder's input ``q = units / (T - P + 1)``."""
        return self.scheduled_units(budget) / (self.total - self.prefix + 1)


def is_integer(value) -> bool:
    """An int or a NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_integer(name: str, value) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an integer of at least 1 (``ArgumentTypeError`` for
    another type)."""
    if not is_integer(value) or value < 1:
        raise refusal(is_integer(value))(f"{name} must be a positive integer, got {value!r}")


def _budget_value(value, name: str) -> float:
    """One budget as a Python float: a real number, not a bool; a numpy scalar as ``_held_budget`` reads it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a float in (0, 1] or one per batch row, got {value!r}")
    if isinstance(value, np.floating):
        return _held_budget(float(value), float(str(value)), sixteen_bits=value.dtype.itemsize < 4)
    return float(value)


def _shortest_decimal(value: float, dtype: torch.dtype) -> float:
    """The shortest decimal that ``dtype`` stores as ``value`` (a float32 0.7 holds 0.69999998...); ``value`` itself
    where there is none (NaN, infinities)."""
    for digits in range(1, 10):  # 9 significant digits tell every float32 apart
        decimal = float(f"{value:.{digits}g}")
        if torch.tensor(decimal, dtype=dtype).item() == value:
            return decimal
    return value


def _held_budget(value: float, decimal: float, sixteen_bits: bool) -> float:
    """The budget that a number narrower than float64, holding ``value`` and written shortest as ``decimal``,
    stands for: in 32 bits ``decimal`` (a float32 0.7 holds 0.69999998... and buys the units of 0.7, a bin edge);
    in 16, whose decimals are coarse, the larger of the two (a float16 17/32, an edge of 32 units that it holds
    exactly, buys its own units, not those of its decimal 0.531)."""
    return max(value, decimal) if sixteen_bits else decimal


def resolve_budgets(latency_budget, batch_size: int, name: str = "latency_budget") -> list[float]:
    """One Python float per batch row from a float, a list, or a 0-D/1-D tensor.

    Raises ``ValueError`` naming the argument (``name``) for values outside (0, 1], NaN, or a row
    count other than ``batch_size``, and ``ArgumentTypeError`` (a ``ValueError`` too) for what is not
    a number (bools and strings included).
    """
    if isinstance(latency_budget, torch.Tensor):
        if latency_budget.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor, which holds no values; give a float, a list, or a "
                             "tensor with values")
        if latency_budget.dim() > 1:
            raise ValueError(f"{name} must be a float or a 1-D tensor, got shape {tuple(latency_budget.shape)}")
        if latency_budget.dtype == torch.bool or latency_budget.is_complex():
            raise ArgumentTypeError(f"{name} must be a real-valued tensor, got {latency_budget.dtype}")
        values = [float(v) for v in latency_budget.detach().cpu().reshape(-1).tolist()]  # integer dtypes too
        if latency_budget.dtype != torch.float64:
            dtype = latency_budget.dtype
            values = [_held_budget(v, _shortest_decimal(v, dtype), dtype.itemsize < 4) for v in values]
        if latency_budget.dim() == 0:
            values = values * batch_size
    elif isinstance(latency_budget, (list, tuple)):
        values = [_budget_value(v, name) for v in latency_budget]
    elif isinstance(latency_budget, numbers.Real):
        values = [_budget_value(latency_budget, name)] * batch_size
    else:
        raise ArgumentTypeError(
            f"{name} must be a float in (0, 1], a list or a 1-D tensor of them, got {type(latency_budget).__name__}"
        )
    if len(values) != batch_size:
        raise ValueError(f"{name} has {len(values)} values but the batch has {batch_size} rows; give one float or one per row")
    for v in values:
        if not (0.0 < v <= 1.0):  # also rejects NaN
            raise ValueError(f"{name} must lie in (0, 1], got {v}")
    return values


def group_sizes(intermediate_size: int, num_groups: int) -> list[int]:
    """Neurons per MLP group; on a remainder the first groups hold one neuron more."""
    base, extra = divmod(intermediate_size, num_groups)
    return [base + (1 if g < extra else 0) for g in range(num_groups)]


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama-family decoder: what plans, index buffers and the FLOP and byte models are shaped by."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def group_sizes(self) -> list[int]:
        """Neurons per MLP group: G = num_heads groups."""
        return group_sizes(self.intermediate_size, self.num_heads)

    def kv_heads_on(self, heads):
        """Bool [..., Hkv] from the query-head mask ``heads`` [..., H] (torch or numpy): a key/value head is on
        when any of its query heads is."""
        return heads.reshape(*heads.shape[:-1], self.num_kv_heads, -1).any(-1)

    def active_counts(self, heads: torch.Tensor, groups: torch.Tensor) -> tuple:
        """(query heads, key/value heads, neurons) on, float64 [...], from masks ``heads`` [..., H] and
        ``groups`` [..., G] (``kv_heads_on``)."""
        neurons = groups.double() @ torch.tensor(self.group_sizes, dtype=torch.float64, device=groups.device)
        return heads.double().sum(-1), self.kv_heads_on(heads).double().sum(-1), neurons

    def layer_flops(self, heads: torch.Tensor, groups: torch.Tensor, seq_len: int,
                    causal: bool = False) -> torch.Tensor:
        """FLOPs of one layer over a prefill of ``seq_len`` tokens.

        ``heads`` [..., H] and ``groups`` [..., G] are masks; a key/value head runs when any of its
        query heads runs. Counts q/k/v/o and gate/up/down products and the two attention products
        over all ``seq_len**2`` query-key pairs, as FLOP counters (and our ops' formulas) do, or with
        ``causal`` over the ``seq_len * (seq_len + 1) / 2`` pairs a causal mask keeps (the least work).
        """
        q, kv, neurons = self.active_counts(heads, groups)
        proj = 2 * seq_len * self.hidden_size * self.head_dim
        pairs = seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len
        attention = q * (2 * proj + 4 * self.head_dim * pairs) + kv * 2 * proj
        return attention + neurons * 3 * 2 * seq_len * self.hidden_size

    def decode_bytes(self, layers: torch.Tensor, heads: torch.Tensor, groups: torch.Tensor, cached: int,
                     element_size: int) -> torch.Tensor:
        """Bytes one decode token must read per layer: float64 [..., L] from masks ``layers`` [..., L],
        ``heads`` [..., L, H] and ``groups`` [..., L, G].

        An executed layer reads its two norms' weights, the q and o weights of its active query
        heads, the k and v weights and the ``cached`` keys and values of its active key/value heads
        (those with an active query head), and the gate, up and down weights of its active neurons.
        """
        q, kv, neurons = self.active_counts(heads, groups)
        D, d = self.hidden_size, self.head_dim
        return (2 * D * layers.double() + 2 * d * D * q + 2 * d * (D + cached) * kv + 3 * D * neurons) * element_size


def check_bool_tensor(label: str, mask, wanted: str = "a bool tensor") -> None:
    """``ArgumentTypeError`` (``label`` must be ``wanted``) unless ``mask`` is a bool tensor."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        what = type(mask).__name__ if not isinstance(mask, torch.Tensor) else f"a {mask.dtype} tensor"
        raise ArgumentTypeError(f"{label} must be {wanted}, got {what}")


def _check_mask(name: str, mask, dims: int) -> torch.Tensor:
    check_bool_tensor(f"ExecutionPlan.{name}", mask, f"a bool tensor with {dims} dims")
    if mask.dim() != dims:
        raise ValueError(f"ExecutionPlan.{name} must be a bool tensor with {dims} dims, got {mask.dim()} dims")
    if mask.is_meta:
        raise ValueError(f"ExecutionPlan.{name} is on the meta device, which holds no values; make it on the "
                         "model's device (or the CPU)")
    return mask


def check_skipped_layers(layers, heads, groups, name: str) -> None:
    """``ValueError`` (naming ``name``) when a skipped layer has a head or a group on; torch tensors or
    numpy arrays."""
    orphan = ~layers & (heads.any(-1) | groups.any(-1))
    if orphan.any():
        row, layer = torch.as_tensor(orphan).nonzero()[0].tolist()
        raise ValueError(f"{name}: layer {layer} of row {row} is skipped but has heads or groups on")


class ExecutionPlan:
    """Which decoder units run, per batch row.

    ``layers`` bool [B, L]; ``heads`` bool [B, L, H]; ``groups`` bool [B, L, G] with G = H MLP
    neuron groups. A skipped layer must have no head and no group on (else ``ValueError``).
    ``shape`` and ``seq_len`` (set by ``ak.plan``) let ``cost()`` weigh units by their FLOPs.
    """

    def __init__(self, layers: torch.Tensor, heads: torch.Tensor, groups: torch.Tensor, *,
                 shape: DecoderShape | None = None, seq_len: int | None = None):
        self.layers = _check_mask("layers", layers, 2)
        self.heads = _check_mask("heads", heads, 3)
        self.groups = _check_mask("groups", groups, 3)
        B, L = layers.shape
        if heads.shape[:2] != (B, L) or groups.shape[:2] != (B, L):
            raise ValueError(
                f"ExecutionPlan shapes disagree: layers {tuple(layers.shape)}, heads {tuple(heads.shape)}, "
                f"groups {tuple(groups.shape)}; heads and groups must be [B, L, ...] with layers [B, L]"
            )
        if B == 0 or L == 0 or heads.shape[2] == 0:
            raise ValueError(f"ExecutionPlan needs at least one row, one layer and one head, got heads {tuple(heads.shape)}")
        if heads.shape[2] != groups.shape[2]:
            raise ValueError(f"ExecutionPlan needs as many groups as heads, got {heads.shape[2]} heads and {groups.shape[2]} groups")
        if not (layers.device == heads.device == groups.device):
            raise ValueError("ExecutionPlan.layers, .heads and .groups must be on one device")
        check_skipped_layers(layers, heads, groups, "ExecutionPlan")
        if shape is not None and not (isinstance(shape, DecoderShape)
                                      and (shape.num_layers, shape.num_heads) == (L, heads.shape[2])):
            raise refusal(isinstance(shape, DecoderShape))(
                f"ExecutionPlan: shape must be None or a DecoderShape of {L} layers and {heads.shape[2]} heads, "
                f"got {shape!r}")
        if seq_len is not None and not (is_integer(seq_len) and seq_len >= 1):
            raise refusal(is_integer(seq_len))(
                f"ExecutionPlan: seq_len must be None or a positive integer, got {seq_len!r}")
        self.shape = shape
        self.seq_len = None if seq_len is None else int(seq_len)

    @classmethod
    def full(cls, batch_size: int, num_layers: int, num_heads: int, device=None) -> "ExecutionPlan":
        """A plan with every unit on (valid by construction: not checked, so no device sync)."""
        for name, value in (("batch_size", batch_size), ("num_layers", num_layers), ("num_heads", num_heads)):
            check_positive_integer(f"ExecutionPlan.full: {name}", value)
        return cls._valid(torch.ones(batch_size, num_layers, dtype=torch.bool, device=device),
                          torch.ones(batch_size, num_layers, num_heads, dtype=torch.bool, device=device),
                          torch.ones(batch_size, num_layers, num_heads, dtype=torch.bool, device=device))

    @property
    def batch_size(self) -> int:
        return self.layers.shape[0]

    @property
    def num_layers(self) -> int:
        return self.layers.shape[1]

    @property
    def num_heads(self) -> int:
        return self.heads.shape[2]

    @classmethod
    def _valid(cls, layers, heads, groups, shape=None, seq_len=None) -> "ExecutionPlan":
        """A plan of masks known to be valid (checked before, or valid by construction): no checks, so
        no device sync."""
        plan = object.__new__(cls)
        plan.layers, plan.heads, plan.groups, plan.shape, plan.seq_len = layers, heads, groups, shape, seq_len
        return plan

    def to(self, device) -> "ExecutionPlan":
        """The same plan on ``device`` (checked when made, so not checked again: no device sync); its masks
        stay bool, so a dtype is refused."""
        if not isinstance(device, (torch.device, str, int)) or isinstance(device, bool):
            raise ArgumentTypeError(f"ExecutionPlan.to: device must be a torch.device, str or int (the masks stay "
                                    f"bool), got {device!r}")
        return ExecutionPlan._valid(self.layers.to(device), self.heads.to(device), self.groups.to(device),
                                    self.shape, self.seq_len)

    def rows(self, index) -> "ExecutionPlan":
        """The plan of some batch rows: ``index`` is an int (one row, kept as a batch of one), a slice, or
        a list, tuple, tensor or bool mask of rows."""
        if isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point():
            index = index.item()
        if isinstance(index, tuple):  # rows, not a tensor index over dimensions
            index = list(index)
        if is_integer(index):
            if not -self.batch_size <= index < self.batch_size:
                raise ValueError(f"ExecutionPlan.rows: index {index} is out of range for {self.batch_size} rows")
            index = [int(index)]
        elif not isinstance(index, (slice, list, torch.Tensor)):
            raise ArgumentTypeError(f"ExecutionPlan.rows: index must be an int, a slice, or a list, tuple, tensor "
                                    f"or bool mask of rows, got {type(index).__name__}")
        if isinstance(index, list) and not (all(map(is_integer, index))
                                            or all(isinstance(i, (bool, np.bool_)) for i in index)):
            raise ArgumentTypeError(f"ExecutionPlan.rows: a list or tuple of rows holds ints, or bools (a mask), "
                                    f"got {index!r}")
        try:
            layers = self.layers[index]
        except (IndexError, TypeError, ValueError, RuntimeError) as err:  # ValueError: a slice's negative step
            message = f"ExecutionPlan.rows: index {index!r} does not select rows of {self.batch_size}: {err}"
            raise ValueError(message) from None
        if layers.dim() != 2:
            raise ValueError(f"ExecutionPlan.rows: index {index!r} must pick rows along one dimension (an index of "
                             f"shape [n], or a mask of the {self.batch_size} rows)")
        if len(layers) == 0:
            raise ValueError(f"ExecutionPlan.rows: index {index!r} must select at least one row")
        return ExecutionPlan(layers, self.heads[index], self.groups[index], shape=self.shape, seq_len=self.seq_len)

    def cost(self) -> torch.Tensor:
        """float64 [B]: the share of the full decoder's FLOPs this plan spends.

        With a known ``shape`` and ``seq_len`` (plans made by ``ak.plan``) units are weighed by
        their analytic FLOPs (projections and attention at that prompt length); otherwise every
        head and every group of a layer weighs the same and attention and MLP halves count equally.
        """
        self._check_values("cost")
        heads, groups = self.heads.cpu(), self.groups.cpu()
        if self.shape is None or self.seq_len is None:
            per_layer = 0.5 * heads.double().mean(-1) + 0.5 * groups.double().mean(-1)
            return per_layer.mean(-1)
        spent = self.shape.layer_flops(heads, groups, self.seq_len).sum(-1)
        full = self.shape.layer_flops(torch.ones_like(heads[0, 0]), torch.ones_like(groups[0, 0]), self.seq_len)
        return spent / (full * self.num_layers)

    def summary(self, row: int = 0) -> str:
        """One line: which layers run, and heads/groups on per executed layer, for batch row ``row``."""
        if not is_integer(row) or not -self.batch_size <= row < self.batch_size:
            raise refusal(is_integer(row))(
                f"ExecutionPlan.summary: row must index one of the {self.batch_size} rows, got {row!r}")
        self._check_values("summary")
        on = self.layers[row].nonzero().flatten().tolist()
        h = self.heads[row].sum(-1).tolist()
        g = self.groups[row].sum(-1).tolist()
        return f"layers {on} | heads/layer {[h[i] for i in on]} | groups/layer {[g[i] for i in on]}"

    def __eq__(self, other) -> bool:
        """The same masks, wherever each plan is."""
        if not isinstance(other, ExecutionPlan):
            return False
        self._check_values("==")
        other._check_values("==")
        other = other.to(self.layers.device)
        return (torch.equal(self.layers, other.layers) and torch.equal(self.heads, other.heads)
                and torch.equal(self.groups, other.groups))

    def _check_values(self, method: str) -> None:
        """``ValueError`` for a plan on the meta device (a request's there, say), whose masks hold no values."""
        if self.layers.is_meta:
            raise ValueError(f"ExecutionPlan {method}: this plan is on the meta device, whose masks hold no values; "
                             "only its shapes can be read")

    def __repr__(self) -> str:
        B, L, H = self.heads.shape
        executed = "unknown (on meta)" if self.layers.is_meta else self.layers.sum(-1).tolist()
        return f"ExecutionPlan(batch={B}, layers={L}, heads={H}, executed layers per row={executed})"


def active_index(mask: np.ndarray) -> np.ndarray:
    """Indices of the True entries of each row, ascending, padded with -1: bool [R, N] -> int64 [R, n_max]."""
    width = int(mask.sum(-1).max()) if mask.size else 0
    out = np.full((mask.shape[0], width), -1, dtype=np.int64)
    rows, columns = mask.nonzero()  # row by row, ascending
    # counts in int64 (here and in attention_units): torch.compile runs numpy as torch, which has no bool cumsum
    out[rows, mask.cumsum(-1, dtype=np.int64)[rows, columns] - 1] = columns
    return out


@dataclass
class LayerIndices:
    """One decoder layer's share of a plan, as the index buffers the kernels read.

    ``batch_rows``: batch rows that execute the layer (None: all rows; ``num_batch_rows`` of them). For
    those R rows, ``q_rows`` and ``kv_rows`` [R, n] are the weight rows of the active query / key-value
    heads, ``qkv_rows`` [R, nq*d + 2*nkv*d] the same rows of q, k and v stacked in one weight (q's rows,
    then k's after them, then v's), ``q_to_kv`` [R, nq] maps each active query head to its slot among the
    active kv heads, and ``mlp_rows`` [R, n] are the active neurons; each but ``q_to_kv`` None: every
    unit on (the dense path; a fixed-width layer lists every unit instead), and -1 pads a row with fewer
    active units. ``batch_rows_on`` bool [R]: in a fixed-width layer (``fixed_width_schedule``), which
    batch rows execute it (the others get no output bias either); else None.
    """

    batch_rows: torch.Tensor | None
    num_batch_rows: int
    q_rows: torch.Tensor | None
    kv_rows: torch.Tensor | None
    qkv_rows: torch.Tensor | None
    q_to_kv: torch.Tensor
    mlp_rows: torch.Tensor | None
    num_q_heads: int
    num_kv_heads: int
    num_neurons: int
    batch_rows_on: torch.Tensor | None = None


@dataclass
class Schedule:
    """An ``ExecutionPlan`` compiled once per request: per layer its ``LayerIndices`` or None if no row runs it."""

    plan: ExecutionPlan
    layers: list


def unit_rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Unit indices [R, n] -> their weight rows [R, n*size] (unit u: rows u*size .. u*size + size - 1); -1 stays -1."""
    rows = units[..., None] * size + torch.arange(size, device=units.device)
    return rows.clamp_min_(-1).flatten(1)  # a -1 unit gives -size..-1: all -1


def _shifted(units: np.ndarray, offset: int) -> np.ndarray:
    """Units moved ``offset`` units down (into a stacked weight); -1 stays -1."""
    return np.where(units >= 0, units + offset, -1)


def attention_units(heads: np.ndarray, shape: DecoderShape) -> tuple:
    """R rows' active heads: bool [R, H] -> (q heads [R, nq], kv heads [R, nkv], q_to_kv [R, nq]),
    int64, ascending, -1 padded; a head's weight rows are ``unit_rows(heads, head_dim)``.

    A key/value head is active when any of its query heads is; ``q_to_kv`` gives each active
    query head's slot among its row's active kv heads.
    """
    per_kv = heads.shape[-1] // shape.num_kv_heads
    kv_on = shape.kv_heads_on(heads)
    q_units, kv_units = active_index(heads), active_index(kv_on)
    slot = kv_on.cumsum(-1, dtype=np.int64) - 1
    q_to_kv = np.where(q_units >= 0, np.take_along_axis(slot, np.maximum(q_units // per_kv, 0), 1), -1)
    return q_units, kv_units, q_to_kv


def neuron_units(groups: np.ndarray, shape: DecoderShape) -> tuple[np.ndarray, int]:
    """R rows' active MLP neurons as (units int64 [R, n], size) from bool [R, G]: ``unit_rows(units,
    size)`` lists the neurons, ascending, -1 padded. Equal groups are units of their size; unequal
    ones are listed neuron by neuron (size 1)."""
    M, G = shape.intermediate_size, groups.shape[1]
    if M % G == 0:
        return active_index(groups), M // G
    return active_index(np.repeat(groups, group_sizes(M, G), axis=-1)), 1


@dataclass(frozen=True, eq=False)
class _Units:
    """An index list built on the host, kept as units until it reaches the device: stands for
    ``unit_rows(units, size)``."""

    units: np.ndarray
    size: int


def listed_schedule(plan: ExecutionPlan, shape: DecoderShape, device=None) -> Schedule:
    """Index buffers of every layer of ``plan`` on ``device`` (default: the plan's), built once per request;
    the Schedule's plan is a copy of ``plan`` on ``device``, which later in-place edits of its masks do not reach.

    The masks reach the host in one copy (and ``device``, where it is another, in one). Index lists are
    built, all at once, only for the layers that some row runs partially, as head and neuron-group
    units; they reach the device in one copy and are expanded to weight rows there. Layers without
    lists that run the same rows share one ``LayerIndices``. One synchronisation per request, and
    host work that grows with the partial layers only.
    """
    device = torch.device(device) if device is not None else plan.layers.device
    B, L, H = plan.heads.shape
    flat = torch.cat([plan.layers.reshape(-1), plan.heads.reshape(-1), plan.groups.reshape(-1)])  # a copy of the masks
    plan = ExecutionPlan._valid(*unflatten_masks(flat.to(device), B, L, H), plan.shape, plan.seq_len)
    on, heads, groups = unflatten_masks(flat.cpu().numpy(), B, L, H)
    check_skipped_layers(on, heads, groups, "execution_plan")  # again: a plan's masks may be edited in place
    return Schedule(plan, _layer_indices(on, heads, groups, shape, device))


def unflatten_masks(flat, B: int, L: int, H: int) -> tuple:
    """(layers [B, L], heads [B, L, H], groups [B, L, H]) as views of ``flat``, a plan's three masks
    laid end to end (torch or numpy)."""
    layers, heads, groups = flat[:B * L], flat[B * L:B * L * (1 + H)], flat[B * L * (1 + H):]
    return layers.reshape(B, L), heads.reshape(B, L, H), groups.reshape(B, L, H)


def dense_layer(batch_size: int, shape: DecoderShape, device: torch.device) -> LayerIndices:
    """The ``LayerIndices`` of a layer that every row of the batch runs with every unit on (cached and
    shared: read-only). Inside a CUDA-graph capture they are made afresh, not cached: a tensor made there holds
    its values only once the graph replays, and a later eager call would read it before."""
    if capturing(device):
        return _dense_layer.__wrapped__(batch_size, shape, device)
    return _dense_layer(batch_size, shape, device)


@functools.lru_cache(maxsize=64)
def _dense_layer(batch_size: int, shape: DecoderShape, device: torch.device) -> LayerIndices:
    H = shape.num_heads
    with torch.inference_mode(False):  # kept for later requests, which may save it for backward
        q_to_kv = (torch.arange(H, device=device) // (H // shape.num_kv_heads)).expand(batch_size, H)
    return LayerIndices(batch_rows=None, num_batch_rows=batch_size, q_rows=None, kv_rows=None, qkv_rows=None,
                        q_to_kv=q_to_kv, mlp_rows=None, num_q_heads=H, num_kv_heads=shape.num_kv_heads,
                        num_neurons=shape.intermediate_size)


def _layer_indices(on: np.ndarray, heads: np.ndarray, groups: np.ndarray, shape: DecoderShape, device) -> list:
    """Per layer its ``LayerIndices`` on ``device``, or None when no row runs it, from the host masks
    (layers [B, L], heads and groups [B, L, H], numpy bool)."""
    B, L, H = heads.shape
    # the per-layer facts in numpy: a few microseconds where each torch op on tiny tensors costs several
    rows_of = [[] for _ in range(L)]  # per layer the rows that run it, ascending
    for l, r in zip(*(i.tolist() for i in on.T.nonzero())):
        rows_of[l].append(r)
    partial_attention = np.flatnonzero((on & ~heads.all(-1)).any(0)).tolist()
    partial_mlp = np.flatnonzero((on & ~groups.all(-1)).any(0)).tolist()

    def masks_of(masks, layer_ids):  # [rows, H]: these layers' running rows, layer by layer
        return np.concatenate([masks[rows_of[l], l] for l in layer_ids])

    def starts(layer_ids):  # layer -> its first row in the lists built for these layers
        return dict(zip(layer_ids, itertools.accumulate((len(rows_of[l]) for l in layer_ids), initial=0)))

    if partial_attention:
        q_all, kv_all, map_all = attention_units(masks_of(heads, partial_attention), shape)
        q_heads = np.where(on, heads.sum(-1), 0).max(0).tolist()  # [L]: most heads of a running row
        kv_heads = np.where(on, shape.kv_heads_on(heads).sum(-1), 0).max(0).tolist()
    if partial_mlp:
        neurons_all, neuron_size = neuron_units(masks_of(groups, partial_mlp), shape)
        neurons = np.where(on, groups @ np.array(shape.group_sizes), 0).max(0).tolist()
    attention_start, mlp_start = starts(partial_attention), starts(partial_mlp)
    d, dense = shape.head_dim, dense_layer(B, shape, device)
    some_rows = {}  # rows -> the spec of a layer that only these rows run, every unit on (shared)
    specs = []  # per layer: its LayerIndices, the fields of one still to build, or None when no row runs it
    for l, rows in enumerate(rows_of):
        if not rows:
            specs.append(None)
            continue
        R = len(rows)
        listed = l in attention_start or l in mlp_start
        if not listed and R == B:
            specs.append(dense)
            continue
        if not listed and tuple(rows) in some_rows:
            specs.append(some_rows[tuple(rows)])
            continue
        listed_rows = None if R == B else _Units(np.array(rows, dtype=np.int64), 1)
        spec = {**vars(dense_layer(R, shape, device)), "batch_rows": listed_rows}
        if l in attention_start:
            a, nq, nkv = attention_start[l], q_heads[l], kv_heads[l]
            q, kv = q_all[a:a + R, :nq], kv_all[a:a + R, :nkv]
            # units of the stacked q, k, v weight: q's heads, then k's, then v's
            qkv = np.concatenate([q, _shifted(kv, H), _shifted(kv, H + shape.num_kv_heads)], axis=1)
            spec.update(q_rows=_Units(q, d), kv_rows=_Units(kv, d), qkv_rows=_Units(qkv, d),
                        q_to_kv=_Units(map_all[a:a + R, :nq], 1), num_q_heads=nq, num_kv_heads=nkv)
        if l in mlp_start:
            m, nn = mlp_start[l], neurons[l]
            spec.update(mlp_rows=_Units(neurons_all[m:m + R, :nn // neuron_size], neuron_size), num_neurons=nn)
        if not listed:
            some_rows[tuple(rows)] = spec
        specs.append(spec)
    unique = {id(spec): spec for spec in specs if isinstance(spec, dict)}
    _materialize(list(unique.values()), device)
    made = {key: LayerIndices(**spec) for key, spec in unique.items()}
    return [made.get(id(spec), spec) for spec in specs]


_INDEX_FIELDS = ("batch_rows", "q_rows", "kv_rows", "qkv_rows", "q_to_kv", "mlp_rows")


def _materialize(specs: list, device) -> None:
    """Replace every index list built on the host (``_Units``) in ``specs`` (distinct LayerIndices
    fields) by weight rows on ``device``.

    All lists cross in one copy, as units; there, each unit size is expanded in one pass and cut
    back into per-layer views.
    """
    lists = {id(v): v for spec in specs for f in _INDEX_FIELDS if isinstance(v := spec[f], _Units)}
    if not lists:
        return
    order = sorted(lists.items(), key=lambda item: item[1].size)  # each unit size one stretch of the copy
    flat = torch.from_numpy(np.concatenate([u.units.reshape(-1) for _, u in order])).to(device)
    done, at = {}, 0
    for size, group in itertools.groupby(order, key=lambda item: item[1].size):
        group = list(group)
        count = sum(u.units.size for _, u in group)
        stretch = flat[at:at + count]
        at += count
        if size > 1:
            stretch = unit_rows(stretch[:, None], size).reshape(-1)
        for (key, u), piece in zip(group, torch.split(stretch, [u.units.size * size for _, u in group])):
            done[key] = piece.view(*u.units.shape[:-1], u.units.shape[-1] * size)
    for spec in specs:
        for f in _INDEX_FIELDS:
            if isinstance(spec[f], _Units):
                spec[f] = done[id(spec[f])]


# ---------------------------------------------------------------------------------------------
# Fixed-width index buffers, built on the device: no host synchronisation, shapes independent of
# the plan, so a whole request can be captured as one CUDA graph
# ---------------------------------------------------------------------------------------------

class CompactPlan(NamedTuple):
    """A plan's index buffers for every (batch row, layer), at fixed widths (the full counts), -1 padded.

    ``q_rows`` [B, L, H*d]: weight rows of the active query heads, ascending; ``kv_rows``
    [B, L, Hkv*d]: of the active key/value heads (one is active when any of its query heads is);
    ``q_to_kv`` [B, L, H]: each active query head's slot among the active kv heads; ``mlp_rows``
    [B, L, M]: the active neurons. ``q_count``, ``kv_count``, ``mlp_count`` [B, L]: the valid
    entries of ``q_rows``, ``kv_rows`` and ``mlp_rows``. All int64. Row ``[b, l]`` of a buffer,
    cut to its count, is what ``listed_schedule`` lists for that batch row and layer.
    """

    q_rows: torch.Tensor
    kv_rows: torch.Tensor
    q_to_kv: torch.Tensor
    mlp_rows: torch.Tensor
    q_count: torch.Tensor
    kv_count: torch.Tensor
    mlp_count: torch.Tensor


def check_compaction(plan: ExecutionPlan, shape: DecoderShape) -> None:
    """``ValueError`` unless ``plan`` has ``shape``'s heads and those divide into its key/value heads."""
    if not isinstance(plan, ExecutionPlan):
        raise ArgumentTypeError(f"plan must be an ExecutionPlan, got {type(plan).__name__}")
    if plan.num_heads != shape.num_heads:
        raise ValueError(f"plan has {plan.num_heads} heads per layer but shape.num_heads is {shape.num_heads}")
    if shape.num_kv_heads < 1 or shape.num_heads % shape.num_kv_heads:
        raise ValueError(f"shape.num_kv_heads must divide the {shape.num_heads} heads, got {shape.num_kv_heads}")


def active_slots(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries along the last axis, ascending, then -1 up to the full length:
    bool [..., N] -> int64 [..., N], on the mask's device without reading it back."""
    N = mask.shape[-1]
    slot = torch.where(mask, mask.cumsum(-1) - 1, N)  # an entry that is off goes to a spare slot N
    out = torch.full((*mask.shape[:-1], N + 1), -1, dtype=torch.int64, device=mask.device)
    out.scatter_(-1, slot, torch.arange(N, device=mask.device).expand(mask.shape))
    return out[..., :N]


def neuron_groups(shape: DecoderShape, num_groups: int, device) -> torch.Tensor:
    """The MLP group of each neuron, int64 [M] (``group_sizes``: the first ``M % G`` groups hold one
    more), made on ``device`` by arithmetic, not copied from the host."""
    base, extra = divmod(shape.intermediate_size, num_groups)
    n = torch.arange(shape.intermediate_size, device=device)
    cut = extra * (base + 1)  # neurons in the larger groups
    return torch.where(n < cut, n // (base + 1), extra + (n - cut) // max(base, 1))


def compact_plan(plan: ExecutionPlan, shape: DecoderShape) -> CompactPlan:
    """``buffer[b, l] = the weight rows of the units on in mask[b, l], ascending, then -1 up to the full count``,
    for every (batch row, layer) of ``plan``, with torch ops on its device and nothing read back to the
    host (``cuda_ext.compact_plan``: the same in one CUDA launch).

    plan.heads [B, L, H], plan.groups [B, L, G] (G MLP groups of ``group_sizes(M, G)`` neurons) ->
    ``CompactPlan``: q_rows [B, L, H*d], kv_rows [B, L, Hkv*d], q_to_kv [B, L, H], mlp_rows
    [B, L, M], counts [B, L] each.
    """
    check_compaction(plan, shape)
    B, L, H = plan.heads.shape
    d, per_kv = shape.head_dim, H // shape.num_kv_heads
    kv_on = shape.kv_heads_on(plan.heads)
    q_units, kv_units = active_slots(plan.heads), active_slots(kv_on)
    kv_slot = kv_on.cumsum(-1) - 1
    q_to_kv = torch.where(q_units >= 0, kv_slot.gather(-1, q_units.clamp_min(0) // per_kv), -1)
    neurons = active_slots(plan.groups[..., neuron_groups(shape, plan.groups.shape[-1], plan.groups.device)])

    def rows(units, size):  # [B, L, n] units -> [B, L, n*size] weight rows
        return unit_rows(units.reshape(B * L, -1), size).view(B, L, -1)

    q_rows, kv_rows = rows(q_units, d), rows(kv_units, d)
    return CompactPlan(q_rows, kv_rows, q_to_kv, neurons, *((t >= 0).sum(-1) for t in (q_rows, kv_rows, neurons)))


def fixed_width_schedule(plan: ExecutionPlan, shape: DecoderShape, buffers: CompactPlan) -> Schedule:
    """``plan`` as a Schedule in which every layer runs on every row at the full widths (H query heads,
    Hkv key/value heads, M neurons), reading views of ``buffers`` (``compact_plan`` of ``plan``).

    A padded (-1) entry reads no weight and gives 0, so a row that skips a layer, whose units are all
    off there, leaves it unchanged. Nothing is read back to the host and no shape depends on the plan:
    a request run on this schedule can be captured as a CUDA graph. The price: every layer is launched
    and the KV cache keeps every layer and key/value head.
    """
    B, L, H = plan.heads.shape
    Hkv, d = shape.num_kv_heads, shape.head_dim
    kv = buffers.kv_rows
    k_rows, v_rows = (torch.where(kv >= 0, kv + offset, -1) for offset in (H * d, (H + Hkv) * d))
    qkv = torch.cat([buffers.q_rows, k_rows, v_rows], dim=-1)  # rows of the stacked q, k, v weight
    return Schedule(plan, [LayerIndices(batch_rows=None, num_batch_rows=B, q_rows=buffers.q_rows[:, l],
                                        kv_rows=kv[:, l], qkv_rows=qkv[:, l], q_to_kv=buffers.q_to_kv[:, l],
                                        mlp_rows=buffers.mlp_rows[:, l], num_q_heads=H, num_kv_heads=Hkv,
                                        num_neurons=shape.intermediate_size, batch_rows_on=plan.layers[:, l])
                           for l in range(L)])
