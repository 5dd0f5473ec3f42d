"""Budget arithmetic, budget parsing, ExecutionPlan validation, cost and index buffers."""

from __future__ import annotations

import pytest
import torch

from adaptive_kernels.plan import DecoderShape, ExecutionPlan, UnitSpace, active_index, compile_plan, resolve_budgets


def test_unit_counts_follow_adallava_formulas():
    L7b = UnitSpace("L", 32, 16, 32, 8)
    assert [L7b.units(b) for b in (1.0, 0.85, 0.6, 0.5, 0.3)] == [16, 11, 3, 0, 0]
    assert L7b.quantised(0.6) == 3 / 17
    H7b = UnitSpace("H", 32, 16, 32, 8)
    assert (H7b.total, H7b.prefix) == (128, 64)
    assert [H7b.units(b) for b in (1.0, 0.85, 0.6, 0.5, 0.4)] == [64, 44, 12, 0, 0]
    assert H7b.quantised(0.85) == 44 / 65


def test_bin_edges_are_exact_for_python_floats_and_float32_tensors():
    space = UnitSpace("L", 10, 5, 4, 2)
    assert space.units(0.7) == 2  # floor(7.0) - 5, not floor(6.9999998) - 5
    (b,) = resolve_budgets(torch.tensor([0.7], dtype=torch.float32), 1)
    assert space.units(b) == 2
    assert resolve_budgets(torch.tensor(0.3, dtype=torch.float64), 2) == [0.3, 0.3]


def test_resolve_budgets_accepts_floats_lists_and_tensors():
    assert resolve_budgets(0.6, 3) == [0.6, 0.6, 0.6]
    assert resolve_budgets([0.5, 1], 2) == [0.5, 1.0]
    assert resolve_budgets(torch.tensor([0.25, 0.75]), 2) == [0.25, 0.75]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), float("inf"), [0.5, 1.2], [0.5], torch.tensor([[0.5, 0.5]])])
def test_resolve_budgets_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="latency_budget"):
        resolve_budgets(bad, 2)


@pytest.mark.parametrize("bad", ["0.5", True, None, {0.5}])
def test_resolve_budgets_rejects_bad_types(bad):
    with pytest.raises(TypeError, match="latency_budget"):
        resolve_budgets(bad, 1)


def _masks(B=2, L=4, H=6):
    g = torch.Generator().manual_seed(0)
    layers = torch.rand(B, L, generator=g) < 0.6
    heads = (torch.rand(B, L, H, generator=g) < 0.5) & layers[..., None]
    groups = (torch.rand(B, L, H, generator=g) < 0.5) & layers[..., None]
    return layers, heads, groups


def test_plan_rejects_inconsistent_masks():
    layers, heads, groups = _masks()
    skipped = (~layers).nonzero()[0]
    bad = heads.clone()
    bad[skipped[0], skipped[1], 0] = True
    with pytest.raises(ValueError, match="skipped"):
        ExecutionPlan(layers, bad, groups)
    with pytest.raises(ValueError, match="bool"):
        ExecutionPlan(layers.int(), heads, groups)
    with pytest.raises(ValueError, match="shapes"):
        ExecutionPlan(layers[:, :3], heads, groups)
    with pytest.raises(ValueError, match="groups"):
        ExecutionPlan(layers, heads, groups[..., :5])


SHAPE = DecoderShape(num_layers=4, hidden_size=48, num_heads=6, num_kv_heads=3, head_dim=8, intermediate_size=100)


def _brute_force_flops(heads, groups, S):
    """Per-layer FLOPs by direct count: each q head's q/o product and attention, each kv head's k/v, each neuron's three products."""
    D, d = SHAPE.hidden_size, SHAPE.head_dim
    sizes = [17, 17, 17, 17, 16, 16]
    total = 0
    for h in range(6):
        if heads[h]:
            total += 2 * (2 * S * D * d) + 2 * (2 * S * S * d)
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


def test_active_index_lists_true_entries_padded():
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert active_index(mask).tolist() == [[1, 2, 4], [-1, -1, -1], [0, -1, -1]]


def test_layer_indices_map_query_heads_to_compact_kv_slots():
    layers = torch.tensor([[True], [True]])
    heads = torch.tensor([[[0, 0, 1, 1, 0, 1]], [[1, 0, 0, 0, 0, 0]]], dtype=torch.bool)
    groups = torch.tensor([[[1, 0, 0, 0, 0, 1]], [[0, 0, 0, 0, 0, 0]]], dtype=torch.bool)
    shape = DecoderShape(1, 48, 6, 3, 8, 100)
    idx = compile_plan(ExecutionPlan(layers, heads, groups), shape).layers[0]
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
    schedule = compile_plan(ExecutionPlan(layers, heads, groups), shape)
    base, extra = divmod(intermediate, 6)
    starts = [g * base + min(g, extra) for g in range(7)]
    for l in range(2):
        rows = schedule.layers[l].mlp_rows
        for r in range(3):
            expected = [n for gr in range(6) if groups[r, l, gr] for n in range(starts[gr], starts[gr + 1])]
            assert rows[r].tolist() == expected + [-1] * (rows.shape[1] - len(expected))
