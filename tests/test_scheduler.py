"""The latency encoder and plan sampling against direct implementations of ADALLAVA.md."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from adaptive_kernels import scheduler
from adaptive_kernels.plan import UnitSpace
from adaptive_kernels.scheduler import (_gumbel_top_n, _gumbel_top_n_units, _ranks, fourier_features, gumbel_pick,
                                        seeded_scheduler)
from oracles import DispatchedOps


@pytest.mark.parametrize("variant,rank", [("L", 1), ("H", 4)])
def test_latency_encoder_follows_the_formula(variant, rank):
    """ADALLAVA.md's encoder written out, for several budgets at once: one below the prefix's share, bin edges a
    float product misses (0.57 of 200 units is 114), and 1.0. 50 layers, 25 in the prefix, 16 heads. In float64
    to float64's rounding (features in float32 were 4e-8 off)."""
    sched = seeded_scheduler(UnitSpace(variant, 50, 25, 16, rank), hidden_size=24).double()
    per_layer = 1 if variant == "L" else 16 // rank
    T, P = 50 * per_layer, 25 * per_layer
    budgets = [0.3, 0.57, 0.7, 0.85, 1.0]
    f = 1.0 / 10000 ** (np.arange(128) / 128)
    rows = []
    for b in budgets:
        q = max(0, math.floor(Fraction(str(b)) * T) - P) / (T - P + 1)
        rows.append(np.concatenate([np.sin(2 * np.pi * q * f), np.cos(2 * np.pi * q * f)]))
    enc, F = sched.latency_encoder, torch.nn.functional
    expected = enc.fc2(F.gelu(enc.fc1(F.layer_norm(torch.tensor(np.stack(rows)), (256,), enc.norm.weight,
                                                     enc.norm.bias))))
    torch.testing.assert_close(sched.latency_embedding(budgets), expected, rtol=1e-12, atol=1e-12)  # float64's


def _rounds_reference(layer_logits, head_logits, group_logits, n, r):
    """ADALLAVA.md's inference for H, round by round: best layer with room, then its best r new heads and groups."""
    K, H = head_logits.shape
    heads = torch.zeros(K, H, dtype=torch.bool)
    groups = torch.zeros(K, H, dtype=torch.bool)
    for _ in range(n):
        room = heads.sum(-1) < H
        layer = int(torch.where(room, layer_logits, -torch.inf).argmax())
        for mask, logits in ((heads, head_logits), (groups, group_logits)):
            free = torch.where(mask[layer], -torch.inf, logits[layer])
            mask[layer, free.topk(r).indices] = True
    return heads.any(-1), heads, groups


@pytest.mark.parametrize("budget", [0.5, 0.6, 0.7, 0.85, 1.0])
def test_inference_top_n_for_h_equals_round_by_round_selection(budget):
    units = UnitSpace("H", 8, 3, 8, 2)
    sched = seeded_scheduler(units, hidden_size=16)
    state = torch.randn(4, 16)
    layers, heads, groups = sched.select(state, [budget] * 4)
    logits = sched.head(state).view(4, 5, 17)
    n = units.scheduled_units(budget)
    for row in range(4):
        ref = _rounds_reference(logits[row, :, 0], logits[row, :, 1:9], logits[row, :, 9:], n, 2)
        assert torch.equal(layers[row], ref[0]) and torch.equal(heads[row], ref[1]) and torch.equal(groups[row], ref[2])


def _best(values: list, count: int, taken=()) -> list:
    """Indices of the ``count`` largest of ``values`` not in ``taken``, ties to the lower index."""
    return sorted((i for i in range(len(values)) if i not in taken), key=lambda i: (-values[i], i))[:count]


@pytest.mark.parametrize("variant,num_layers,num_heads", [("L", 9, 6), ("H", 9, 6), ("L", 70, 6), ("H", 5, 48)])
def test_inference_top_n_breaks_ties_by_the_lower_index(variant, num_layers, num_heads):
    """Logits with many ties (small integers): each round takes the best layer with room (first of equals),
    then its best r new heads and groups (first of equals), as a plain round-by-round loop does. Many
    layers or heads too: torch's sorts keep the order of equals beyond a few dozen only when told to."""
    units = UnitSpace(variant, num_layers, 3 if num_layers > 5 else 2, num_heads, 2)
    sched = seeded_scheduler(units, hidden_size=8)
    K, H, r = num_layers - units.num_prefix_layers, num_heads, units.rank
    per_layer = 1 if variant == "L" else 1 + 2 * H
    g = torch.Generator().manual_seed(5)
    logits = torch.randint(-2, 3, (7, K * per_layer), generator=g).float()
    budgets = [0.35, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0]
    with torch.no_grad():
        sched.head.weight.zero_()
        sched.head.bias.zero_()
        for row, budget in enumerate(budgets):
            sched.head.bias.copy_(logits[row])  # the head's logits of a zero state: its bias
            layers, heads, groups = (m[0] for m in sched.select(torch.zeros(1, 8), [budget]))
            values = logits[row].view(K, per_layer).tolist()
            want_heads = [[False] * H for _ in range(K)]
            want_groups = [[False] * H for _ in range(K)]
            for _ in range(units.scheduled_units(budget)):
                room = [l for l in range(K) if sum(want_heads[l]) < H]
                layer = room[_best([values[l][0] for l in room], 1)[0]]
                for want, offset in ((want_heads, 1), (want_groups, 1 + H)):
                    on = [h for h in range(H) if want[layer][h]]
                    count = H if variant == "L" else r
                    for h in _best(values[layer][offset:offset + H] if variant == "H" else [0] * H, count, on):
                        want[layer][h] = True
            assert layers.tolist() == [any(h) for h in want_heads], (row, budget)
            assert heads.tolist() == want_heads and groups.tolist() == want_groups, (row, budget)


def test_inference_top_n_for_l_keeps_the_best_layers():
    units = UnitSpace("L", 10, 4, 4, 2)
    sched = seeded_scheduler(units, hidden_size=16)
    state = torch.randn(3, 16)
    layers, heads, _ = sched.select(state, [0.7, 0.9, 0.4])
    logits = sched.head(state)
    for row, n in enumerate([3, 5, 0]):
        expected = torch.zeros(6, dtype=torch.bool)
        expected[logits[row].topk(n).indices] = True
        assert torch.equal(layers[row], expected)
        assert torch.equal(heads[row], expected[:, None].expand(-1, 4))


def test_a_nan_logit_ranks_as_plus_infinity():
    """_ranks counts NaN as +inf (first, ties to the lower index), so the top-n picks a NaN unit."""
    x = torch.tensor([[0.5, float("nan"), 2.0, -1.0], [float("inf"), 1.0, float("nan"), float("nan")]])
    assert torch.equal(_ranks(x), _ranks(torch.where(x.isnan(), torch.inf, x)))
    assert _ranks(x).tolist() == [[2, 0, 1, 3], [0, 3, 1, 2]]
    units = UnitSpace("L", 6, 2, 4, 1)
    sched = seeded_scheduler(units, hidden_size=8)
    with torch.no_grad():
        sched.head.weight.zero_()
        sched.head.bias.copy_(torch.tensor([0.0, float("nan"), 1.0, -1.0]))
        layers, _, _ = sched.select(torch.zeros(1, 8), [4 / 6])  # 2 units after the prefix of 2
    assert layers.tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("variant", ["L", "H"])
def test_gumbel_sampling_meets_the_budget_exactly_and_passes_gradients(variant):
    """Rows with different budgets in one batch: a row whose units are all drawn takes no more, and
    gives no NaN (with H, its last layer may be full by then)."""
    units = UnitSpace(variant, 8, 2, 8, 2)
    sched = seeded_scheduler(units, hidden_size=16)
    state = torch.randn(5, 16)
    budgets = [0.3, 0.5, 0.75, 0.9, 1.0]
    for seed in range(20):
        torch.manual_seed(seed)
        layers, heads, groups = sched.select(state, budgets, sample=True)
        for row, b in enumerate(budgets):
            n = units.scheduled_units(b)
            for mask in (layers, heads, groups):
                assert set(mask[row].detach().unique().tolist()) <= {0.0, 1.0}, (seed, row)
            if variant == "L":
                assert int(layers[row].sum()) == n
            else:
                assert int(heads[row].sum()) == 2 * n and int(groups[row].sum()) == 2 * n
                assert torch.equal(layers[row] > 0, heads[row].sum(-1) > 0)
        sched.zero_grad()
        ((heads * torch.randn_like(heads)).sum() + (layers * torch.randn_like(layers)).sum()).backward()
        grad = sched.head.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, seed


def test_a_gumbel_pick_draws_each_available_unit_as_often_as_softmax_says():
    """Gumbel-max: each pick is one-hot, an unavailable unit is never picked, and the others come as often as
    softmax(logits) over the available ones says (the temperature moves no argmax)."""
    logits, available, n = torch.tensor([2.0, 0.0, -1.0, 1.0]), torch.tensor([True, True, True, False]), 200_000
    torch.manual_seed(0)
    picks = gumbel_pick(logits.expand(n, 4), available.expand(n, 4))
    assert set(picks.unique().tolist()) <= {0.0, 1.0} and torch.equal(picks.sum(-1), torch.ones(n))
    want = torch.cat([logits[:3].softmax(-1), torch.zeros(1)])
    torch.testing.assert_close(picks.mean(0), want, rtol=0, atol=0.005)  # about 11 standard deviations


def test_a_gumbel_pick_of_a_row_with_nothing_available_is_zeros_and_a_zero_draw_is_finite(monkeypatch):
    """A row with nothing available picks nothing, in value and gradient; a uniform draw of exactly 0 (torch.rand
    can give it) still picks one available unit, with a finite gradient."""
    logits = torch.randn(2, 5, generator=torch.Generator().manual_seed(6), requires_grad=True)
    available = torch.tensor([[True, False, True, False, False], [False] * 5])
    picked = gumbel_pick(logits, available)
    picked.sum().backward()
    assert torch.equal(picked[1], torch.zeros(5)) and torch.equal(logits.grad[1], torch.zeros(5))
    assert picked[0].sum() == 1 and picked[0][~available[0]].sum() == 0
    _fixed_noise(monkeypatch, torch.zeros(2, 5))
    logits.grad = None
    picked = gumbel_pick(logits, available)
    picked.sum().backward()
    assert picked.isfinite().all() and picked[0].sum() == 1 and logits.grad.isfinite().all()


def _fixed_noise(monkeypatch, u: torch.Tensor | None) -> None:
    """The scheduler's uniform draws replaced: ``u`` (None: 1/2 everywhere, a noise that softmax shifts away)."""
    monkeypatch.setattr(torch, "rand_like", lambda like, dtype=None: (torch.full_like(like, 0.5) if u is None else u)
                        .to(dtype or like.dtype))


def test_a_gumbel_pick_has_the_gradient_of_its_soft_sample(monkeypatch):
    """Straight-through, as ADALLAVA.md: the value is the one-hot of the soft sample's argmax, the gradient that of
    the soft sample softmax((logits - log(-log u)) / 5) over the available units."""
    gen = torch.Generator().manual_seed(5)
    logits, u, w = (torch.randn(3, 6, generator=gen), torch.rand(3, 6, generator=gen), torch.randn(3, 6, generator=gen))
    available = torch.rand(3, 6, generator=gen) < 0.6
    available[:, 0], available[2] = True, torch.arange(6) == 4  # one row with a single unit available
    _fixed_noise(monkeypatch, u)
    ours = logits.clone().requires_grad_()
    picked = gumbel_pick(ours, available)
    (picked * w).sum().backward()
    theirs = logits.clone().requires_grad_()
    soft = torch.softmax(((theirs - torch.log(-torch.log(u))) / 5).masked_fill(~available, float("-inf")), -1)
    (soft * w).sum().backward()
    assert torch.equal(picked.detach(), torch.nn.functional.one_hot(soft.argmax(-1), 6).float())
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_h_sampling_passes_gradients_through_the_layer_pick_and_the_head_pick(monkeypatch):
    """Variant H, one round at rank 1, noise fixed: a head's mask is the picked layer's straight-through one-hot
    times the picked head's, so a loss sum(heads * w) gives the layer logits the soft layer sample's gradient of
    w[:, :, h*], and the picked layer's head logits the soft head sample's gradient of w[:, k*, :]."""
    _fixed_noise(monkeypatch, None)
    B, K, H = 2, 3, 4
    gen = torch.Generator().manual_seed(9)
    layer_logits, head_logits, group_logits = (torch.randn(*shape, generator=gen).requires_grad_()
                                               for shape in ((B, K), (B, K, H), (B, K, H)))
    w = torch.randn(B, K, H, generator=gen)
    layers, heads, groups = _gumbel_top_n_units(layer_logits, head_logits, group_logits, torch.ones(B, dtype=torch.long), 1)
    (heads * w).sum().backward()
    rows = torch.arange(B)
    k = layer_logits.argmax(-1)
    h, g = head_logits[rows, k].argmax(-1), group_logits[rows, k].argmax(-1)
    for mask, unit in ((heads, h), (groups, g)):
        want = torch.zeros(B, K, H)
        want[rows, k, unit] = 1.0
        assert torch.equal(mask.detach(), want)
    layer_ref = layer_logits.detach().requires_grad_()
    (torch.softmax(layer_ref / 5, -1) * w[rows, :, h]).sum().backward()
    head_ref = head_logits.detach()[rows, k].requires_grad_()
    (torch.softmax(head_ref / 5, -1) * w[rows, k]).sum().backward()
    want_head_grad = torch.zeros(B, K, H)
    want_head_grad[rows, k] = head_ref.grad
    torch.testing.assert_close(layer_logits.grad, layer_ref.grad)
    torch.testing.assert_close(head_logits.grad, want_head_grad)
    assert layer_ref.grad.abs().sum() > 0


def _soft_sample(logits, u, chosen):
    """One round of ADALLAVA.md's sampling written out: the soft Gumbel sample over the units not ``chosen`` yet
    (temperature 5), as a straight-through one-hot (value: the hard pick; gradient: the soft sample's). A row with
    every unit chosen draws among all of them: its callers multiply its pick by 0."""
    chosen = chosen & ~chosen.all(-1, keepdim=True)
    soft = torch.softmax(((logits - torch.log(-torch.log(u))) / 5).masked_fill(chosen, float("-inf")), -1)
    hard = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).float()
    return hard + soft - soft.detach()


def test_l_sampling_sums_straight_through_picks_over_rounds_each_with_its_gradient(monkeypatch):
    """Variant L, noise fixed, rows drawing 3, 1 and 0 units: the plan is the sum of one straight-through pick per
    round among the units not chosen before, and every round's soft sample passes its gradient."""
    gen = torch.Generator().manual_seed(11)
    logits, u, w = (torch.randn(3, 7, generator=gen), torch.rand(3, 7, generator=gen), torch.randn(3, 7, generator=gen))
    counts = torch.tensor([3, 1, 0])
    _fixed_noise(monkeypatch, u)
    ours = logits.clone().requires_grad_()
    picked = _gumbel_top_n(ours, counts)
    (picked * w).sum().backward()
    theirs = logits.clone().requires_grad_()
    want = torch.zeros(3, 7)
    for r in range(3):
        want = want + _soft_sample(theirs, u, want.detach() > 0) * (r < counts)[:, None]
    (want * w).sum().backward()
    torch.testing.assert_close(picked.detach(), want.detach())  # the same one-hots, up to rounding
    assert picked.detach().sum(-1).tolist() == [3, 1, 0]
    torch.testing.assert_close(ours.grad, theirs.grad)
    assert theirs.grad[1].abs().sum() > 0 and not theirs.grad[2].any()


def test_h_sampling_over_several_rounds_passes_every_rounds_gradients(monkeypatch):
    """Variant H, noise fixed, rank 2, rows drawing 3 and 2 units: each round's layer pick (among layers with a
    free head) times each of its rank head and group picks (among those not taken in that layer), summed over
    rounds; a loss reaches every round's soft samples."""
    _fixed_noise(monkeypatch, None)  # every uniform draw 1/2
    B, K, H, rank = 2, 3, 4, 2
    counts = torch.tensor([3, 2])
    gen = torch.Generator().manual_seed(13)
    logits = [torch.randn(*shape, generator=gen) for shape in ((B, K), (B, K, H), (B, K, H))]
    w_heads, w_groups = torch.randn(B, K, H, generator=gen), torch.randn(B, K, H, generator=gen)
    ours = [t.clone().requires_grad_() for t in logits]
    layers, heads, groups = _gumbel_top_n_units(*ours, counts, rank)
    ((heads * w_heads).sum() + (groups * w_groups).sum()).backward()

    theirs = [t.clone().requires_grad_() for t in logits]
    rows = torch.arange(B)
    want = {"layers": torch.zeros(B, K), "heads": torch.zeros(B, K, H), "groups": torch.zeros(B, K, H)}
    for r in range(int(counts.max())):
        active = (r < counts).float()[:, None]
        layer = _soft_sample(theirs[0], torch.full((B, K), 0.5), want["heads"].detach().sum(-1) >= H) * active
        k = layer.detach().argmax(-1)
        for name, unit_logits in (("heads", theirs[1]), ("groups", theirs[2])):
            for _ in range(rank):
                pick = _soft_sample(unit_logits[rows, k], torch.full((B, H), 0.5), want[name].detach()[rows, k] > 0)
                want[name] = want[name] + layer[..., None] * pick[:, None, :]
        want["layers"] = torch.maximum(want["layers"], layer)
    ((want["heads"] * w_heads).sum() + (want["groups"] * w_groups).sum()).backward()
    for got, name in zip((layers, heads, groups), ("layers", "heads", "groups")):
        torch.testing.assert_close(got.detach(), want[name].detach(), msg=name)  # up to rounding
    assert heads.detach().sum((1, 2)).tolist() == [rank * 3, rank * 2]
    for got, expected in zip(ours, theirs):
        torch.testing.assert_close(got.grad, expected.grad)


def test_gumbel_samples_differ_between_draws_but_not_under_one_seed():
    units = UnitSpace("L", 12, 2, 4, 2)
    sched = seeded_scheduler(units, hidden_size=8)
    state = torch.zeros(1, 8)
    torch.manual_seed(1)
    a = sched.select(state, [0.6], sample=True)[0]
    torch.manual_seed(1)
    b = sched.select(state, [0.6], sample=True)[0]
    draws = {tuple(sched.select(state, [0.6], sample=True)[0][0].tolist()) for _ in range(20)}
    assert torch.equal(a, b) and len(draws) > 1


def test_latency_embedding_follows_weight_changes():
    """Embeddings (features kept per quantised budget) come from the encoder's weights of the moment: a weight
    changed in place (through ``.data`` too, which no version counter sees), replaced, in a replaced module,
    in a new dtype or on another device gives the new encoder's output, never a stale one."""
    sched = seeded_scheduler(UnitSpace("H", 8, 4, 4, 2), hidden_size=16)

    def fresh(budgets):  # each row's budget alone
        return torch.cat([sched.latency_encoder(torch.tensor([sched.units.quantised(b)], dtype=torch.float64))
                          for b in budgets])

    with torch.no_grad():
        budgets = [0.9, 0.6, 0.9]
        torch.testing.assert_close(sched.latency_embedding(budgets), fresh(budgets), rtol=0, atol=0)
        sched.latency_encoder.fc2.bias.add_(torch.randn(16))
        torch.testing.assert_close(sched.latency_embedding(budgets), fresh(budgets), rtol=0, atol=0)
        sched.latency_encoder.fc2.bias.data.add_(torch.randn(16))
        torch.testing.assert_close(sched.latency_embedding(budgets), fresh(budgets), rtol=0, atol=0)
        sched.latency_encoder.fc1.weight = torch.nn.Parameter(torch.randn(16, 256))
        torch.testing.assert_close(sched.latency_embedding([0.6]), fresh([0.6]), rtol=0, atol=0)
        sched.latency_encoder.fc2 = torch.nn.Linear(16, 16)  # a whole module replaced
        torch.testing.assert_close(sched.latency_embedding([0.6]), fresh([0.6]), rtol=0, atol=0)
        sched.double()
        assert sched.latency_embedding([0.6]).dtype == torch.float64
        torch.testing.assert_close(sched.latency_embedding([0.6]), fresh([0.6]), rtol=0, atol=0)
    embedding = sched.latency_embedding([0.6])
    assert embedding.requires_grad  # with autograd: computed, differentiable
    sched.to("meta")  # another device (meta: shapes only): the features are made there, not taken from the CPU
    assert sched.latency_embedding([0.6, 0.9]).device.type == "meta"


def test_per_row_counts_in_a_capture_copy_nothing_from_the_host(monkeypatch):
    """Rows with different budgets inside a CUDA-graph capture: each count is written by a fill that holds it. An
    indexed assignment of a Python int copies a host scalar, which a capture refuses (pageable memory)."""
    monkeypatch.setattr(scheduler, "capturing", lambda x: True)
    values = [int(v) for v in torch.randint(0, 50, (5,))] + [51]
    with DispatchedOps() as ops:
        counts = scheduler._per_row(values, torch.empty(0))
    assert counts.tolist() == values and counts.dtype == torch.int64
    assert not {"copy_", "lift_fresh", "_to_copy"} & {name.split(".")[1] for name in ops.seen}, ops.seen


def test_features_made_inside_a_capture_are_not_kept(monkeypatch):
    """A budget's Fourier features are made once and kept, but not when first made inside a CUDA-graph capture,
    where they hold nothing until the graph is replayed: the next eager request makes them again, then keeps them."""
    made = []
    monkeypatch.setattr(scheduler, "fourier_features", lambda q: made.append(q) or fourier_features(q))
    sched = seeded_scheduler(UnitSpace("H", 8, 4, 4, 2), hidden_size=16)
    with monkeypatch.context() as capture:
        capture.setattr(scheduler, "capturing", lambda x: True)
        for _ in range(2):
            sched.latency_embedding([0.7])
        assert len(made) == 2
    for _ in range(2):
        sched.latency_embedding([0.7])
    assert len(made) == 3


@pytest.mark.parametrize("variant", ["L", "H"])
def test_each_row_gets_its_own_budgets_units_in_any_mix_of_budgets(variant):
    """Batches with one, two or three distinct budgets, repeated in any order: every row's top-n (and Gumbel
    draw) holds its own budget's units and equals that row selected alone, never another row's count."""
    units = UnitSpace(variant, 9, 3, 6, 2)
    sched = seeded_scheduler(units, hidden_size=12)
    gen = torch.Generator().manual_seed(21)
    for mix in ([0.4, 0.9], [0.9, 0.4], [1.0, 0.5, 1.0], [0.5, 0.5, 0.8, 0.8], [0.35, 0.6, 0.95], [0.7]):
        state = torch.randn(len(mix), 12, generator=gen)
        layers, heads, groups = sched.select(state, mix)
        torch.manual_seed(len(mix))
        drawn = sched.select(state, mix, sample=True)
        for row, b in enumerate(mix):
            n = units.scheduled_units(b)
            want = n * (units.num_heads if variant == "L" else units.rank)  # heads (and groups) on
            assert int(heads[row].sum()) == int(groups[row].sum()) == want, (mix, row)
            assert int(drawn[1][row].detach().sum()) == int(drawn[2][row].detach().sum()) == want, (mix, row)
            alone = sched.select(state[row:row + 1], [b])
            for got, expected in zip((layers, heads, groups), alone):
                assert torch.equal(got[row], expected[0]), (mix, row)


def test_a_fresh_scheduler_leaves_the_global_rng_untouched():
    """seeded_scheduler (what ak.patch uses without a file) draws its weights from its own seed 0: the same weights
    whatever the global seed, and the caller's random stream goes on as if no scheduler had been made."""
    units = UnitSpace("H", 7, 3, 6, 2)
    torch.manual_seed(17)
    want = torch.rand(5)
    torch.manual_seed(17)
    a = seeded_scheduler(units, hidden_size=10)
    assert torch.equal(torch.rand(5), want)
    torch.manual_seed(18)
    b = seeded_scheduler(units, hidden_size=10)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("variant", ["L", "H"])
def test_a_float64_scheduler_ranks_its_logits_in_float64(variant):
    """Inference's top-n orders logits in the scheduler's precision (float32 at least): float64 logits 1e-12 apart,
    equal once rounded to float32, go by value, not by index as a tie does."""
    sched = seeded_scheduler(UnitSpace(variant, 8, 4, 8, 2), hidden_size=16).double()
    close = torch.tensor([0.5, 0.5 + 1e-12, 0.5 + 2e-12], dtype=torch.float64)
    if variant == "L":
        bias, budget = torch.cat([close, torch.tensor([-1.0], dtype=torch.float64)]), 6 / 8  # two layers
    else:  # scheduled layer 0 first, its heads and groups 0 to 2 close: one unit of two heads and two groups
        bias = torch.full((4, 17), -1.0, dtype=torch.float64)
        bias[0, 0], bias[0, 1:4], bias[0, 9:12] = 1.0, close, close
        bias, budget = bias.flatten(), 17 / 32
    with torch.no_grad():
        sched.head.weight.zero_()
        sched.head.bias.copy_(bias)
        layers, heads, groups = sched.select(torch.zeros(1, 16, dtype=torch.float64), [budget])
    if variant == "L":
        assert layers[0].tolist() == [False, True, True, False]
    else:
        assert layers[0].tolist() == [True, False, False, False]
        assert heads[0, 0].nonzero().flatten().tolist() == groups[0, 0].nonzero().flatten().tolist() == [1, 2]
