"""Budget arithmetic, budget parsing, ExecutionPlan validation, cost and index buffers."""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

from adaptive_kernels.errors import ArgumentTypeError
from adaptive_kernels.plan import (DecoderShape, ExecutionPlan, UnitSpace, active_index, compact_plan, listed_schedule,
                                  resolve_budgets)


def test_unit_counts_follow_adallava_formulas():
    L7b = UnitSpace("L", 32, 16, 32, 8)
    assert [L7b.scheduled_units(b) for b in (1.0, 0.85, 0.6, 0.5, 0.3)] == [16, 11, 3, 0, 0]
    assert L7b.quantised(0.6) == 3 / 17
    H7b = UnitSpace("H", 32, 16, 32, 8)
    assert (H7b.total, H7b.prefix) == (128, 64)
    assert [H7b.scheduled_units(b) for b in (1.0, 0.85, 0.6, 0.5, 0.4)] == [64, 44, 12, 0, 0]
    assert H7b.quantised(0.85) == 44 / 65


def test_bin_edges_are_exact_for_python_floats_and_float32_tensors():
    space = UnitSpace("L", 10, 5, 4, 2)
    assert space.scheduled_units(0.7) == 2  # floor(7.0) - 5, not floor(6.9999998) - 5
    h13b = UnitSpace("H", 40, 20, 40, 8)  # 200 units, 100 in the prefix
    # 200 * 0.57 is 113.99999999999999 in floats
    assert (h13b.scheduled_units(0.57), h13b.scheduled_units(0.58)) == (14, 16)
    odd = UnitSpace("L", 7, 3, 4, 1)
    # a fraction and its decimal
    assert odd.scheduled_units(4 / 7) == 1 and odd.scheduled_units(0.5714285714285714) == 1
    for units in (UnitSpace("L", 32, 16, 32, 8), UnitSpace("H", 32, 16, 32, 8), h13b, UnitSpace("H", 7, 2, 12, 1), odd):
        for hundredths in range(1, 101):  # two-decimal budgets
            exact = Fraction(hundredths, 100) * units.total
            floor = exact.numerator // exact.denominator
            assert units.scheduled_units(hundredths / 100) == max(0, floor - units.prefix)
        for k in range(1, units.total + 1):  # budgets of k units of T, as fractions
            assert units.scheduled_units(k / units.total) == max(0, k - units.prefix)
    (b,) = resolve_budgets(torch.tensor([0.7], dtype=torch.float32), 1)
    assert space.scheduled_units(b) == 2
    written = [hundredths / 100 for hundredths in range(1, 101)]
    # a float32 tensor's budget is the decimal written; a 16-bit one's that where the tensor holds less, else what
    # it holds
    assert resolve_budgets(torch.tensor(written, dtype=torch.float32), 100) == written
    # a NumPy float32 scalar too: 12/13 held in 32 bits lies above the edge, its decimal below it
    decimal = float(str(np.float32(12 / 13)))
    assert decimal < 12 / 13 < float(np.float32(12 / 13))
    assert resolve_budgets(np.float32(12 / 13), 1) == resolve_budgets(torch.tensor(12 / 13), 1) == [decimal]
    for dtype in (torch.float16, torch.bfloat16):
        held = torch.tensor(written, dtype=dtype).tolist()
        assert resolve_budgets(torch.tensor(written, dtype=dtype), 100) == list(map(max, written, held)), dtype
    assert h13b.scheduled_units(resolve_budgets(torch.tensor(0.57, dtype=torch.float16), 1)[0]) == 14
    assert resolve_budgets(torch.tensor(0.3, dtype=torch.float64), 2) == [0.3, 0.3]


def test_a_budget_just_below_an_edge_buys_the_units_below_it():
    """The tolerance that keeps floats' rounding of k/T on its edge is far under 1e-7: a budget that much under an
    edge of 200 units stays under it (counted here with exact fractions)."""
    space = UnitSpace("L", 200, 0, 8, 2)
    for b in (0.57 - 1e-7, 0.5 - 2e-7, 1 - 1e-7):
        exact = Fraction(b) * 200
        assert space.scheduled_units(b) == exact.numerator // exact.denominator, b


def test_a_float32_budget_whose_shortest_decimal_has_eight_digits_buys_that_decimals_units():
    """A float32 16/29 holds less than the edge 16/29 of 29 units; its shortest decimal, 0.55172414, eight
    significant digits, reaches it and buys 16 units, as the Python float 16/29 does."""
    held = torch.tensor(16 / 29, dtype=torch.float32).item()
    (b,) = resolve_budgets(torch.tensor(16 / 29, dtype=torch.float32), 1)
    assert held < 16 / 29 <= b == 0.55172414
    assert UnitSpace("L", 29, 0, 8, 2).scheduled_units(b) == 16


def test_a_float32_budget_is_its_shortest_decimal_however_many_digits_it_needs():
    """A float32 tensor's budgets are the shortest decimals that float32 reads back as the values held (NumPy's repr
    of a float32 is that decimal), for random budgets; and an edge k/T (T < 400) that a float32 holds below and its
    shortest decimal, of nine significant digits, reaches buys its k units."""
    held = torch.rand(400, generator=torch.Generator().manual_seed(11), dtype=torch.float64).clamp_min(1e-3)
    held = held.to(torch.float32)
    assert resolve_budgets(held, 400) == [float(str(np.float32(v))) for v in held.tolist()]
    shortest = {(k, T): str(np.float32(k / T)) for T in range(2, 400) for k in range(1, T)}
    nine_digit_edges = [(k, T) for (k, T), decimal in shortest.items()
                        if float(np.float32(k / T)) < k / T <= float(decimal) and len(decimal.lstrip("0.")) == 9]
    assert nine_digit_edges
    for k, T in nine_digit_edges[:50]:
        (b,) = resolve_budgets(torch.tensor([k / T], dtype=torch.float32), 1)
        assert UnitSpace("L", T, 0, 8, 2).scheduled_units(b) == k, (k, T)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_an_integer_tensor_budget_resolves_to_python_floats(dtype):
    """resolve_budgets gives one Python float per row whatever the tensor's dtype: an integer tensor of ones gives
    1.0 (the narrow integer dtypes gave the int 1), which buys every unit."""
    resolved = resolve_budgets(torch.ones(2, dtype=dtype), 2)
    assert resolved == [1.0, 1.0] and all(type(b) is float for b in resolved), resolved
    assert UnitSpace("H", 8, 4, 8, 2).scheduled_units(resolved[0]) == 16


def test_a_plan_refuses_groups_of_other_rows_or_layers_even_where_they_broadcast():
    """heads and groups are [B, L, H] with layers [B, L]: a [B, 1, H] or [1, L, H] mask is refused, not broadcast."""
    layers, heads = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3, 4, dtype=torch.bool)
    for groups in (torch.ones(2, 1, 4, dtype=torch.bool), torch.ones(1, 3, 4, dtype=torch.bool)):
        with pytest.raises(ValueError, match="ExecutionPlan shapes disagree"):
            ExecutionPlan(layers, heads, groups)
        with pytest.raises(ValueError, match="ExecutionPlan shapes disagree"):
            ExecutionPlan(layers, groups, heads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "numpy float16"])
def test_a_half_precision_budget_on_a_bin_edge_buys_that_edges_units(dtype):
    """Budgets of whole units, k/T, that a half-precision tensor holds exactly (ADALLAVA's training grids k/32 and
    k/128 among them) count k units, as the same Python floats do. Read as their shortest decimals (17/32 in float16
    is 0.531), 30 of the 7B H grid's bfloat16 budgets lost a unit."""
    for units in (UnitSpace("L", 32, 16, 32, 8), UnitSpace("H", 32, 16, 32, 8), UnitSpace("H", 8, 4, 8, 2)):
        edges = [k / units.total for k in range(1, units.total + 1)]
        if dtype == "numpy float16":
            held = [np.float16(b) for b in edges]
            resolved = resolve_budgets(held, len(held))
        else:
            held = torch.tensor(edges, dtype=dtype).tolist()
            resolved = resolve_budgets(torch.tensor(edges, dtype=dtype), len(edges))
        exact = [k for k, (b, h) in enumerate(zip(edges, held), 1) if float(h) == b]
        assert len(exact) >= units.total // 2  # the grid points at and above 0.5 at least
        for k in exact:
            assert units.scheduled_units(resolved[k - 1]) == max(0, k - units.prefix), (units, k)


def test_resolve_budgets_accepts_floats_lists_and_tensors():
    assert resolve_budgets(0.6, 3) == [0.6, 0.6, 0.6]
    assert resolve_budgets([0.5, 1], 2) == [0.5, 1.0]
    assert resolve_budgets((0.5, 1), 2) == [0.5, 1.0]
    assert resolve_budgets(torch.tensor([0.25, 0.75]), 2) == [0.25, 0.75]


RANGE = "must lie in (0, 1]"


@pytest.mark.parametrize("bad,message", [(0.0, RANGE), (-0.1, RANGE), (1.5, RANGE), (float("nan"), RANGE),
                                         (float("inf"), RANGE), ([0.5, 1.2], RANGE),
                                         ([0.5], "has 1 values but the batch has 2 rows"),
                                         (torch.tensor([[0.5, 0.5]]), "must be a float or a 1-D tensor")])
def test_resolve_budgets_rejects_bad_values(bad, message):
    """Each refusal names latency_budget and what it accepts: a value in (0, 1], one per row, a 1-D tensor."""
    with pytest.raises(ValueError, match=re.escape(f"latency_budget {message}")):
        resolve_budgets(bad, 2)


def test_numpy_scalars_count_as_the_decimal_written():
    space = UnitSpace("L", 10, 5, 4, 2)
    (b,) = resolve_budgets(np.float32(0.7), 1)
    assert b == 0.7 and space.scheduled_units(b) == 2
    assert resolve_budgets([np.float64(0.25), np.float32(0.5)], 2) == [0.25, 0.5]


@pytest.mark.parametrize("bad", ["0.5", True, None, {0.5}, [True], ["0.5"], [0.5, None], torch.tensor([True]),
                                 np.array([0.5])])
def test_resolve_budgets_rejects_bad_types(bad):
    with pytest.raises(ArgumentTypeError, match="latency_budget"):
        resolve_budgets(bad, 1)
    with pytest.raises(ValueError):  # the package's bad-input errors are all ValueErrors
        resolve_budgets(bad, 1)


def _masks(B=2, L=4, H=6):
    g = torch.Generator().manual_seed(0)
    layers = torch.rand(B, L, generator=g) < 0.6
    heads = (torch.rand(B, L, H, generator=g) < 0.5) & layers[..., None]
    groups = (torch.rand(B, L, H, generator=g) < 0.5) & layers[..., None]
    return layers, heads, groups


def test_plan_rejects_inconsistent_masks():
    layers, heads, groups = _masks()
    row, layer = next((r, l) for r, l in (~layers).nonzero().tolist() if r != l)  # told apart in the message
    for on_in_skipped in ("heads", "groups"):  # a unit on in a skipped layer, of either kind
        masks = {"heads": heads.clone(), "groups": groups.clone()}
        masks[on_in_skipped][row, layer, 0] = True
        with pytest.raises(ValueError, match=f"layer {layer} of row {row} is skipped but has heads or groups on"):
            ExecutionPlan(layers, **masks)
    with pytest.raises(ValueError, match="bool"):
        ExecutionPlan(layers.int(), heads, groups)
    with pytest.raises(ValueError, match="shapes"):
        ExecutionPlan(layers[:, :3], heads, groups)
    with pytest.raises(ValueError, match="groups"):
        ExecutionPlan(layers, heads, groups[..., :5])
    for empty in ((layers[:0], heads[:0], groups[:0]),  # no row
                  (layers[:, :0], heads[:, :0], groups[:, :0]),  # no layer
                  (layers, heads[..., :0], groups[..., :0])):  # no head
        with pytest.raises(ValueError, match="at least one row, one layer and one head"):
            ExecutionPlan(*empty)


SHAPE = DecoderShape(num_layers=4, hidden_size=48, num_heads=6, num_kv_heads=3, head_dim=8, intermediate_size=100)


def test_a_plan_edited_in_place_is_checked_again_when_compiled():
    layers, heads, groups = _masks()
    row, layer = layers.nonzero()[0].tolist()
    heads[row, layer, 0] = True
    plan = ExecutionPlan(layers, heads, groups)
    plan.layers[row, layer] = False  # its heads stay on
    shape = DecoderShape(num_layers=4, hidden_size=12, num_heads=6, num_kv_heads=3, head_dim=2, intermediate_size=18)
    with pytest.raises(ValueError, match=f"execution_plan: layer {layer} of row {row} is skipped"):
        listed_schedule(plan, shape)


def test_rows_take_an_int_a_slice_a_list_or_a_mask():
    layers, heads, groups = _masks(B=3)
    plan = ExecutionPlan(layers, heads, groups)
    for index, picked in ((1, [1]), (-1, [2]), (torch.tensor(2), [2]), (slice(1, 3), [1, 2]), ([2, 0], [2, 0]),
                          ((0, 1), [0, 1]), ((2,), [2]), (torch.tensor([True, False, True]), [0, 2]),
                          ([True, False, True], [0, 2]), ([np.int64(1)], [1]),
                          (list(np.array([1, 0, 1]) > 0), [0, 2])):  # numpy bools
        part = plan.rows(index)
        assert part.batch_size == len(picked)
        for got, whole in zip((part.layers, part.heads, part.groups), (layers, heads, groups)):
            assert torch.equal(got, whole[picked])


def test_a_plans_repr_counts_its_executed_layers_and_a_meta_plans_its_shapes_only():
    layers, heads, groups = _masks(B=3)
    plan = ExecutionPlan(layers, heads, groups)
    B, L, H = heads.shape
    assert repr(plan) == (f"ExecutionPlan(batch={B}, layers={L}, heads={H}, "
                          f"executed layers per row={[int(n) for n in layers.sum(-1)]})")
    assert repr(plan.to("meta")) == (f"ExecutionPlan(batch={B}, layers={L}, heads={H}, "
                                     "executed layers per row=unknown (on meta))")


@pytest.mark.parametrize("call,error,message", [
    (lambda p: p.rows(3), ValueError, "rows: index 3 is out of range for 3 rows"),
    (lambda p: p.rows([5]), ValueError, "rows: index .* does not select rows of 3"),
    (lambda p: p.rows([]), ValueError, "rows: index .* must select at least one row"),
    (lambda p: p.rows(slice(5, 9)), ValueError, "must select at least one row"),
    (lambda p: p.rows(slice(None, None, -1)), ValueError, r"rows: index slice\(None, None, -1\) does not select rows"),
    (lambda p: compact_plan((p.layers, p.heads, p.groups), SHAPE), ArgumentTypeError,
     "plan must be an ExecutionPlan, got tuple"),
    (lambda p: p.rows("0"), ArgumentTypeError, "rows: index must be an int"),
    (lambda p: p.rows(1.0), ArgumentTypeError, "rows: index must be an int"),
    (lambda p: p.rows(None), ArgumentTypeError, "rows: index must be an int"),
    (lambda p: p.rows([1.5]), ArgumentTypeError, r"rows: a list or tuple of rows holds ints, .* got \[1.5\]"),
    (lambda p: p.rows((0, 2.9)), ArgumentTypeError, r"rows: a list or tuple of rows holds ints, .* got \[0, 2.9\]"),
    (lambda p: p.rows([True, 1]), ArgumentTypeError, "rows: a list or tuple of rows holds ints, or bools"),
    (lambda p: p.to("meta").cost(), ValueError, "ExecutionPlan cost: this plan is on the meta device"),
    (lambda p: p.to("meta").summary(), ValueError, "ExecutionPlan summary: this plan is on the meta device"),
    (lambda p: p == p.to("meta"), ValueError, "ExecutionPlan ==: this plan is on the meta device"),
    (lambda p: p.to("meta") == p, ValueError, "ExecutionPlan ==: this plan is on the meta device"),
    (lambda p: p.summary(3), ValueError, "summary: row must index one of the 3 rows"),
    (lambda p: p.summary(None), ArgumentTypeError, "summary: row"),
    (lambda p: p.to(torch.float16), ArgumentTypeError, "to: device must be a torch.device, str or int"),
    (lambda p: p.rows(()), ValueError, "rows: index .* must select at least one row"),
    (lambda p: p.rows(torch.tensor([[0, 1]])), ValueError, r"(?s)rows: index .* must pick rows along one dimension"),
    (lambda p: p.rows(p.layers), ValueError, r"(?s)rows: index .* a mask of the 3 rows\)"),
    (lambda p: ExecutionPlan.full(2, 0, 8), ValueError, "full: num_layers must be a positive integer"),
    (lambda p: ExecutionPlan.full(2, 8, -1), ValueError, "full: num_heads must be a positive integer"),
    (lambda p: ExecutionPlan.full(2.0, 8, 8), ArgumentTypeError, "full: batch_size must be a positive integer"),
    (lambda p: ExecutionPlan(p.layers, p.heads, p.groups, seq_len=0), ValueError, "seq_len must be None or a positive"),
    (lambda p: ExecutionPlan(p.layers.to("meta"), p.heads, p.groups), ValueError, "layers is on the meta device"),
    (lambda p: ExecutionPlan(p.layers, p.heads, p.groups, seq_len=7.0), ArgumentTypeError, "seq_len must be None"),
    (lambda p: ExecutionPlan(p.layers, p.heads, p.groups, shape=(4, 8)), ArgumentTypeError, "shape must be None or a Dec"),
    (lambda p: ExecutionPlan(p.layers, p.heads, p.groups, shape=dataclasses.replace(SHAPE, num_layers=5)), ValueError,
     "DecoderShape of 4 layers and 6 heads"),
    (lambda p: ExecutionPlan(p.layers, p.heads, p.groups, shape=dataclasses.replace(SHAPE, num_heads=3)), ValueError,
     "DecoderShape of 4 layers and 6 heads"),
    (lambda p: ExecutionPlan(p.layers, p.heads, p.groups, shape=dataclasses.replace(SHAPE, num_heads=8)), ValueError,
     "DecoderShape of 4 layers and 6 heads")])
def test_plan_methods_refuse_bad_arguments_by_name(call, error, message):
    """They raised IndexError or torch's errors, returned plans of no rows, or made float masks (a later
    request failed inside numpy) or plans the constructor refuses."""
    plan = ExecutionPlan(*_masks(B=3))
    with pytest.raises(error, match=message) as refused:
        call(plan)
    assert isinstance(refused.value, TypeError) == (error is ArgumentTypeError)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device: CUDA")
def test_plans_with_the_same_masks_on_two_devices_are_equal():
    plan = ExecutionPlan(*_masks(B=3))
    other = ExecutionPlan.full(*plan.heads.shape)
    assert plan == plan.to("cuda") and plan.to("cuda") == plan and plan.to("cuda") != other


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device: CUDA")
def test_a_plan_refuses_masks_on_two_devices_whichever_is_elsewhere():
    """layers, heads and groups must share one device: a plan with any one of them on another is refused, naming
    the masks."""
    layers, heads, groups = _masks(B=2, L=4, H=6)
    for masks in ((layers, heads, groups.cuda()), (layers, heads.cuda(), groups), (layers.cuda(), heads, groups)):
        with pytest.raises(ValueError, match=r"ExecutionPlan.layers, .heads and .groups must be on one device"):
            ExecutionPlan(*masks)


def _brute_force_flops(heads, groups, S, causal=False):
    """Per-layer FLOPs by direct count: each q head's q/o product and attention (over every query-key pair, or with
    ``causal`` the pairs (i, j) with j <= i), each kv head's k/v, each neuron's three products."""
    D, d = SHAPE.hidden_size, SHAPE.head_dim
    sizes = [17, 17, 17, 17, 16, 16]
    pairs = sum(1 for i in range(S) for j in range(S) if j <= i or not causal)
    total = 0
    for h in range(6):
        if heads[h]:
            total += 2 * (2 * S * D * d) + 2 * (2 * pairs * d)
    for kv in range(3):
        if heads[2 * kv] or heads[2 * kv + 1]:
            total += 2 * (2 * S * D * d)
    for g in range(6):
        if groups[g]:
            total += sizes[g] * 3 * 2 * S * D
    return total


def test_cost_weighs_units_by_flops():
    layers, heads, groups = _masks(B=3, L=4, H=6)
    plan = ExecutionPlan(layers, heads, groups, shape=SHAPE, seq_len=21)
    full = _brute_force_flops([True] * 6, [True] * 6, 21) * 4
    for b in range(3):
        spent = sum(_brute_force_flops(heads[b, l].tolist(), groups[b, l].tolist(), 21) for l in range(4))
        assert plan.cost()[b].item() == pytest.approx(spent / full, rel=1e-12)
    assert ExecutionPlan.full(2, 4, 6).cost().tolist() == [1.0, 1.0]


def test_causal_layer_flops_count_the_pairs_a_causal_mask_keeps():
    """layer_flops(causal=True), what the sweep's prefill floor counts, against the count pair by pair, for random
    masks at odd prompt lengths."""
    layers, heads, groups = _masks(B=3, L=4, H=6)
    for S in (1, 2, 7, 21):
        got = SHAPE.layer_flops(heads, groups, S, causal=True)
        for b in range(3):
            for l in range(4):
                assert got[b, l].item() == _brute_force_flops(heads[b, l].tolist(), groups[b, l].tolist(), S,
                                                              causal=True), (S, b, l)


def test_moved_and_selected_plans_keep_the_shape_their_cost_is_weighed_by():
    layers, heads, groups = _masks(B=3, L=4, H=6)
    plan = ExecutionPlan(layers, heads, groups, shape=SHAPE, seq_len=21)
    assert not torch.equal(plan.cost(), ExecutionPlan(layers, heads, groups).cost())  # the shape matters here
    assert torch.equal(plan.to("cpu").cost(), plan.cost())
    assert torch.equal(plan.rows([2, 0]).cost(), plan.cost()[[2, 0]])


def test_cost_of_a_plan_without_a_shape_counts_units_attention_and_mlp_half_each():
    layers, heads, groups = _masks(B=3, L=4, H=6)
    plan = ExecutionPlan(layers, heads, groups)
    for b in range(3):
        per_layer = [0.5 * heads[b, l].sum().item() / 6 + 0.5 * groups[b, l].sum().item() / 6 for l in range(4)]
        assert plan.cost()[b].item() == pytest.approx(sum(per_layer) / 4, rel=1e-12)
    attention_only = ExecutionPlan(torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 4, 6, dtype=torch.bool),
                                   torch.zeros(1, 4, 6, dtype=torch.bool))
    assert attention_only.cost().tolist() == [0.5]


def test_active_index_lists_true_entries_padded():
    mask = np.array([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=bool)
    assert active_index(mask).tolist() == [[1, 2, 4], [-1, -1, -1], [0, -1, -1]]


def test_layer_indices_map_query_heads_to_compact_kv_slots():
    layers = torch.tensor([[True], [True]])
    heads = torch.tensor([[[0, 0, 1, 1, 0, 1]], [[1, 0, 0, 0, 0, 0]]], dtype=torch.bool)
    groups = torch.tensor([[[1, 0, 0, 0, 0, 1]], [[0, 0, 0, 0, 0, 0]]], dtype=torch.bool)
    shape = DecoderShape(1, 48, 6, 3, 8, 100)
    idx = listed_schedule(ExecutionPlan(layers, heads, groups), shape).layers[0]
    # row 0: q heads 2, 3, 5 -> kv heads 1, 1, 2 -> compact slots 0, 0, 1; row 1: q head 0 -> kv 0 -> slot 0
    assert idx.q_to_kv.tolist() == [[0, 0, 1], [0, -1, -1]]
    assert idx.kv_rows[0].tolist() == list(range(8, 24)) and idx.kv_rows[1].tolist() == list(range(8)) + [-1] * 8
    assert idx.q_rows[0].tolist() == list(range(16, 32)) + list(range(40, 48))
    assert idx.mlp_rows[0].tolist() == list(range(17)) + list(range(84, 100))
    assert idx.num_neurons == 33 and (idx.mlp_rows[1] == -1).all()


@pytest.mark.parametrize("intermediate", [96, 100])
def test_mlp_rows_list_the_neurons_of_active_groups(intermediate):
    g = torch.Generator().manual_seed(3)
    layers = torch.ones(3, 2, dtype=torch.bool)
    heads = torch.rand(3, 2, 6, generator=g) < 0.5
    groups = torch.rand(3, 2, 6, generator=g) < 0.5
    groups[1, 0] = True
    shape = DecoderShape(2, 48, 6, 3, 8, intermediate)
    schedule = listed_schedule(ExecutionPlan(layers, heads, groups), shape)
    base, extra = divmod(intermediate, 6)
    starts = [g * base + min(g, extra) for g in range(7)]
    for l in range(2):
        rows = schedule.layers[l].mlp_rows
        for r in range(3):
            expected = [n for gr in range(6) if groups[r, l, gr] for n in range(starts[gr], starts[gr + 1])]
            assert rows[r].tolist() == expected + [-1] * (rows.shape[1] - len(expected))


@pytest.mark.parametrize("intermediate, num_groups", [(96, 6), (100, 6), (45, 4), (5, 8)])
def test_the_masked_references_neuron_mask_follows_the_partition(intermediate, num_groups):
    """The masked and sliced references (sliced.py) take each group's neurons from the partition the executor's
    index lists use; against the method's own rule, written out here (the first M % G groups hold one neuron more),
    so a wrong partition cannot pass as both the result and its reference."""
    from adaptive_kernels.sliced import neuron_mask

    groups = torch.rand(3, 2, num_groups, generator=torch.Generator().manual_seed(intermediate)) < 0.5
    base, extra = divmod(intermediate, num_groups)
    group_of = [next(g for g in range(num_groups) if n < (g + 1) * base + min(g + 1, extra))
                for n in range(intermediate)]
    assert neuron_mask(groups, intermediate).tolist() == groups[..., group_of].tolist()


def _mixed_plan(seed: int, B: int, L: int, H: int) -> ExecutionPlan:
    """Per (row, layer) one of: skipped, dense, partial heads and groups, or nothing on but the layer."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.randint(0, 4, (B, L), generator=g)
    heads = torch.where((kind == 1)[..., None], True, torch.rand(B, L, H, generator=g) < 0.5)
    groups = torch.where((kind == 1)[..., None], True, torch.rand(B, L, H, generator=g) < 0.5)
    off = (kind == 0) | (kind == 3)
    heads, groups = heads & ~off[..., None], groups & ~off[..., None]
    return ExecutionPlan(kind != 0, heads, groups)


@pytest.mark.parametrize("seed,d,M", [(0, 4, 27), (1, 4, 27), (2, 4, 27), (3, 4, 27), (4, 1, 18), (5, 2, 12),
                                      (6, 3, 6), (7, 2, 14)])
def test_compile_plan_lists_each_layer_rows_and_units_by_definition(seed, d, M):
    """Every layer of a mixed batch, for heads of 1 to 4 weight rows and groups of 1 to 5 neurons (equal or
    not): the rows that run it, and per row its heads, kv slots and neurons written out from the masks, in
    lists as wide as the row with the most units needs; dense layers get no lists (None)."""
    B, L, H, Hkv = 3, 6, 6, 2
    plan = _mixed_plan(seed, B, L, H)
    shape = DecoderShape(L, H * d, H, Hkv, d, M)
    sizes = [M // H + (g < M % H) for g in range(H)]  # the first M % H groups one neuron larger
    starts = [sum(sizes[:g]) for g in range(H)]
    schedule = listed_schedule(plan, shape)
    for l, idx in enumerate(schedule.layers):
        rows = [r for r in range(B) if plan.layers[r, l]]
        if not rows:
            assert idx is None
            continue
        assert (idx.batch_rows is None) == (len(rows) == B) and idx.num_batch_rows == len(rows)
        if idx.batch_rows is not None:
            assert idx.batch_rows.tolist() == rows
        heads, groups = plan.heads[rows, l], plan.groups[rows, l]
        assert (idx.q_rows is None) == bool(heads.all()) and (idx.mlp_rows is None) == bool(groups.all())
        for i, r in enumerate(rows):
            q = [h for h in range(H) if plan.heads[r, l, h]]
            kv = sorted({h // (H // Hkv) for h in q})
            neurons = [starts[g] + j for g in range(H) if plan.groups[r, l, g] for j in range(sizes[g])]

            def listed(t):
                return [v for v in t[i].tolist() if v >= 0]
            assert listed(idx.q_to_kv) == [kv.index(h // (H // Hkv)) for h in q]
            if idx.q_rows is not None:
                assert listed(idx.q_rows) == [h * d + j for h in q for j in range(d)]
                assert listed(idx.kv_rows) == [k * d + j for k in kv for j in range(d)]
                stacked = [offset + k * d + j for offset in (H * d, H * d + Hkv * d) for k in kv for j in range(d)]
                assert listed(idx.qkv_rows) == listed(idx.q_rows) + stacked
            if idx.mlp_rows is not None:
                assert listed(idx.mlp_rows) == neurons
        assert idx.num_q_heads == max(int(plan.heads[r, l].sum()) for r in rows)
        assert idx.num_kv_heads == max(len({h // (H // Hkv) for h in range(H) if plan.heads[r, l, h]}) for r in rows)
        assert idx.num_neurons == max(sum(sizes[g] for g in range(H) if plan.groups[r, l, g]) for r in rows)
        assert idx.q_to_kv.shape == (len(rows), idx.num_q_heads)
        if idx.q_rows is not None:
            assert idx.q_rows.shape[1] == idx.num_q_heads * d and idx.kv_rows.shape[1] == idx.num_kv_heads * d
        assert idx.mlp_rows is None or idx.mlp_rows.shape[1] == idx.num_neurons


def test_layers_run_densely_by_other_rows_keep_their_own_rows():
    """Two layers each run with every unit on by two of four rows, not the same two: each lists its own rows."""
    B, L, H = 4, 3, 6
    g = torch.Generator().manual_seed(21)
    order = torch.randperm(B, generator=g)
    layers = torch.rand(B, L, generator=g) < 0.5
    layers[:, :2] = False
    layers[order[:2], 0] = layers[order[2:], 1] = True
    dense = layers[..., None].expand(B, L, H).clone()
    schedule = listed_schedule(ExecutionPlan(layers, dense, dense.clone()), DecoderShape(L, 24, H, 3, 4, 30))
    for l, idx in enumerate(schedule.layers):
        rows = [r for r in range(B) if layers[r, l]]
        if rows:
            assert idx.num_batch_rows == len(rows)
            assert idx.batch_rows is None if len(rows) == B else idx.batch_rows.tolist() == rows
        else:
            assert idx is None


def test_compile_plan_moves_every_buffer_to_the_device_in_its_shape():
    plan = _mixed_plan(7, 3, 8, 6)
    shape = DecoderShape(8, 24, 6, 2, 4, 27)
    on_cpu, on_meta = listed_schedule(plan, shape).layers, listed_schedule(plan, shape, device="meta").layers
    for a, b in zip(on_cpu, on_meta):
        assert (a is None) == (b is None)
        for field in ("batch_rows", "q_rows", "kv_rows", "q_to_kv", "mlp_rows") if a is not None else ():
            ta, tb = getattr(a, field), getattr(b, field)
            assert (ta is None) == (tb is None), field
            assert ta is None or (tb.device.type == "meta" and tb.shape == ta.shape and tb.dtype == ta.dtype), field


def test_plans_differing_in_one_unit_are_not_equal():
    """Plan equality compares all three masks: a plan with one layer, one head or one neuron group flipped (the
    masks still valid) differs from the original, and a copy of it, or the same masks, is equal."""
    layers, heads, groups = _masks(B=3, L=5, H=6)
    plan = ExecutionPlan(layers, heads, groups)
    assert plan == ExecutionPlan(layers.clone(), heads.clone(), groups.clone()) and plan == plan.to("cpu")
    g = torch.Generator().manual_seed(31)
    row, layer = layers.nonzero()[torch.randint(int(layers.sum()), (1,), generator=g)].flatten().tolist()
    unit = int(torch.randint(6, (1,), generator=g))
    for flipped in ("heads", "groups"):
        masks = {"layers": layers, "heads": heads.clone(), "groups": groups.clone()}
        masks[flipped][row, layer, unit] ^= True
        other = ExecutionPlan(**masks)
        assert plan != other and other != plan, flipped
    off = layers.clone()
    skipped = (~layers).nonzero()[0].tolist()
    off[skipped[0], skipped[1]] = True  # a layer run with no unit on: only .layers differs
    assert plan != ExecutionPlan(off, heads, groups)
    assert plan != "a plan" and plan != layers


def test_cost_needs_both_shape_and_seq_len_to_weigh_by_flops():
    """A plan given only its decoder's shape, or only a prompt length, cannot weigh units by their FLOPs: its
    cost counts units, attention and MLP half each, exactly as a plan given neither does (no error)."""
    layers, heads, groups = _masks(B=3, L=4, H=6)
    by_units = ExecutionPlan(layers, heads, groups).cost()
    for given in ({"shape": SHAPE}, {"seq_len": 21}):
        assert torch.equal(ExecutionPlan(layers, heads, groups, **given).cost(), by_units), given
    assert not torch.equal(ExecutionPlan(layers, heads, groups, shape=SHAPE, seq_len=21).cost(), by_units)


def test_summary_lists_units_of_executed_layers():
    """summary(row): the executed layers of that row, and per executed layer (in that order) its heads and groups on."""
    layers = torch.tensor([[False, True, False, True]])
    heads = torch.tensor([[[0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]]], dtype=torch.bool)
    groups = torch.tensor([[[0, 0, 0], [0, 1, 1], [0, 0, 0], [0, 0, 0]]], dtype=torch.bool)
    assert ExecutionPlan(layers, heads, groups).summary() == "layers [1, 3] | heads/layer [1, 3] | groups/layer [2, 0]"
    second_layers = torch.tensor([[True, False, True, False]])
    second_heads = torch.tensor([[[1, 1, 1], [0, 0, 0], [1, 0, 1], [0, 0, 0]]], dtype=torch.bool)
    second_groups = torch.tensor([[[1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0]]], dtype=torch.bool)
    two_rows = ExecutionPlan(torch.cat([layers, second_layers]), torch.cat([heads, second_heads]),
                             torch.cat([groups, second_groups]))
    assert two_rows.summary(-1) == two_rows.summary(1) == "layers [0, 2] | heads/layer [3, 2] | groups/layer [1, 3]"
    assert two_rows.summary(-2) == two_rows.summary(0) == ExecutionPlan(layers, heads, groups).summary()
