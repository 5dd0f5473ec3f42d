"""head_sparse_attention (Triton) against its PyTorch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adaptive_kernels.backends import get_backend
from adaptive_kernels.errors import ArgumentTypeError
from adaptive_kernels.ops.attention import (_attention_launch, head_sparse_attention,
                                            head_sparse_attention_reference)

from ._util import DEVICE, DTYPE_PARAMS, check, generator, randn

pytestmark = pytest.mark.triton

d = 24  # not a power of two


def _inputs(gen, dtype, R, T, Tk, nq, nkv, q_to_kv, pad=None):
    """q as a view of a [R, T, nq*d] projection, k as a transposed view, left padding ``pad[r]``."""
    q = randn(R, T, nq * d, gen=gen, dtype=dtype).view(R, T, nq, d)
    k = randn(R, Tk, nkv, d, gen=gen, dtype=dtype).transpose(1, 2)
    v = randn(R, nkv, Tk, d, gen=gen, dtype=dtype)
    valid = torch.ones(R, Tk, dtype=torch.bool)
    for r, p in enumerate(pad or []):
        valid[r, :p] = False
    return q, k, v, torch.tensor(q_to_kv, dtype=torch.int64, device=DEVICE), valid.to(DEVICE)


def _check(dtype, q, k, v, q_to_kv, valid, splits=None):
    scale = d ** -0.5
    o = head_sparse_attention(q, k, v, q_to_kv, valid, scale) if splits is None else \
        _attention_launch(q, k, v, q_to_kv, valid, scale, splits)
    ref = head_sparse_attention_reference(q.float(), k.float(), v.float(), q_to_kv, valid, scale)
    check(o, ref, dtype)
    return o


# (R, T, Tk, nkv, q_to_kv per row, left padding per row)
CASES = {
    # prefill: T = Tk, causal; GQA (two q heads per kv slot), a padded q head (-1), left padding
    # long enough that row 1's first queries see no key at all
    "prefill-gqa-pad": (2, 37, 37, 2, [[0, 0, 1, -1], [1, 1, 0, 0]], [0, 9]),
    "prefill-mha": (1, 21, 21, 3, [[0, 1, 2]], None),
    # decode against a longer cache
    "decode-1": (3, 1, 70, 3, [[0, 1, 2, 2], [2, 0, -1, -1], [-1, -1, -1, -1]], [0, 5, 69]),
    "decode-3": (2, 3, 70, 2, [[1, 0, 0], [0, 0, 1]], [4, 0]),
    # chunk of new queries against a cache (T < Tk, many queries)
    "extend": (2, 19, 45, 2, [[0, 1], [1, -1]], [3, 0]),
}


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", list(CASES))
def test_head_sparse_attention(dtype, case):
    R, T, Tk, nkv, q_to_kv, pad = CASES[case]
    gen = generator(dtype, case)
    inputs = _inputs(gen, dtype, R, T, Tk, nkv=nkv, nq=len(q_to_kv[0]), q_to_kv=q_to_kv, pad=pad)
    o = _check(dtype, *inputs)
    if case == "prefill-gqa-pad":  # the early queries of row 1 see no key; padded head 3 of row 0
        assert bool((o[1, :9] == 0).all()) and bool((o[0, :, 3] == 0).all())


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("T,splits", [(1, 4), (3, 2), (1, 8), (2, 16)])
def test_decode_split_keys(dtype, T, splits):
    """Decode with the keys split over programs and merged by the second kernel: also into as many splits as an
    H100 takes (up to 16; the interpreter's 4 multiprocessors never ask for more than 4), most of them holding no
    key here (300 keys, 64 per split)."""
    gen = generator(dtype, T, splits)
    inputs = _inputs(gen, dtype, 2, T, 300, nq=3, nkv=2, q_to_kv=[[0, 1, 1], [1, -1, -1]], pad=[0, 290])
    _check(dtype, *inputs, splits=splits)


@pytest.mark.parametrize("scale", [0.05, 0.7, -0.7, 0.0])
@pytest.mark.parametrize("case", ["prefill-gqa-pad", "decode-3"])
def test_scale_other_than_the_head_dims(case, scale):
    """``scale`` multiplies the scores whatever it is (Llama's is d**-0.5, which every other case uses; a negative
    one weighs the lowest scores most, 0 weighs the visible keys alike): the kernel and the reference against
    softmax attention written out per row and head."""
    R, T, Tk, nkv, q_to_kv, pad = CASES[case]
    q, k, v, q_to_kv, valid = _inputs(generator(case, scale), torch.float32, R, T, Tk, nq=len(q_to_kv[0]),
                                      nkv=nkv, q_to_kv=q_to_kv, pad=pad)
    want = torch.zeros(q.shape)
    for r in range(R):
        for head, slot in enumerate(q_to_kv[r].tolist()):
            if slot < 0:
                continue
            seen = valid[r].cpu() & (torch.arange(Tk) <= torch.arange(Tk - T, Tk)[:, None])  # [T, Tk]
            scores = (scale * q[r, :, head].cpu() @ k[r, slot].cpu().T).masked_fill(~seen, float("-inf"))
            weights = scores.softmax(-1).nan_to_num()  # a query that sees no key attends to nothing
            want[r, :, head] = weights @ v[r, slot].cpu()
    check(head_sparse_attention(q, k, v, q_to_kv, valid, scale), want.to(q.device), torch.float32)
    check(head_sparse_attention_reference(q, k, v, q_to_kv, valid, scale), want.to(q.device), torch.float32)


def test_empty():
    gen = generator(1)
    q, k, v, _, valid = _inputs(gen, torch.float32, 2, 3, 5, nq=1, nkv=1, q_to_kv=[[0], [0]])
    o = head_sparse_attention(q[:, :, :0], k, v, torch.empty((2, 0), dtype=torch.int64, device=DEVICE), valid, 0.5)
    assert o.shape == (2, 3, 0, d)


def test_bad_arguments_are_refused_by_name():
    gen = generator("bad")
    q, k, v, q_to_kv, valid = _inputs(gen, torch.float32, 2, 3, 5, nq=2, nkv=1, q_to_kv=[[0, 0], [0, -1]])
    wrong_value, wrong_type = ValueError, ArgumentTypeError
    rows_of_q = r"k and v must be \[2, nkv, Tk, 24\]"
    for args, error, message in [((q, k, v[:, :, :4], q_to_kv, valid), wrong_value, "k, v one shape"),
                                 ((q, k[..., :8], v[..., :8], q_to_kv, valid), wrong_value, "k and v must be"),
                                 ((q, k[:1], v[:1], q_to_kv, valid), wrong_value, rows_of_q),  # read past
                                 ((q, k.repeat(2, 1, 1, 1)[:3], v.repeat(2, 1, 1, 1)[:3], q_to_kv, valid), wrong_value,
                                  rows_of_q),  # a row more, ignored
                                 ((q, k.half(), v, q_to_kv, valid), wrong_type, "q, k and v must share"),
                                 ((q, k, v.half(), q_to_kv, valid), wrong_type, "q, k and v must share"),
                                 ((q, k[:, :, :2], v[:, :, :2], q_to_kv, valid[:, :2]), wrong_value,
                                  "k must hold at least 3"),
                                 ((q, k.half(), v.half(), q_to_kv, valid), wrong_type, "q, k and v must share"),
                                 ((q.double(), k.double(), v.double(), q_to_kv, valid), wrong_type,
                                  "float32, float16 or bfloat16"),
                                 ((q, k, v, q_to_kv[:, :1], valid), wrong_value, "q_to_kv must be"),
                                 ((q, k, v, q_to_kv.float(), valid), wrong_type, "q_to_kv must be int64"),
                                 ((q, k, v, q_to_kv, valid[:, :4]), wrong_value, "kv_valid must be"),
                                 ((q, k, v, q_to_kv, valid.float()), wrong_type, "kv_valid must be bool")]:
        with pytest.raises(error, match=message) as refused:
            head_sparse_attention(*args, 0.5)
        assert isinstance(refused.value, TypeError) == (error is wrong_type)
    for scale, error in [(torch.tensor(0.5), wrong_type), (None, wrong_type), (float("nan"), wrong_value)]:
        with pytest.raises(error, match="scale must be"):
            head_sparse_attention(q, k, v, q_to_kv, valid, scale)
    torch.testing.assert_close(head_sparse_attention(q, k, v, q_to_kv, valid, np.float32(0.375)),
                               head_sparse_attention(q, k, v, q_to_kv, valid, 0.375), rtol=0, atol=0)


def test_opcheck_and_flops():
    gen = generator(2)
    R, T, Tk, nq = 2, 3, 5, 2
    args = _inputs(gen, torch.float32, R, T, Tk, nq=nq, nkv=1, q_to_kv=[[0, 0], [0, -1]]) + (0.5,)
    torch.library.opcheck(torch.ops.adaptive_kernels.head_sparse_attention.default, args)
    with FlopCounterMode(display=False) as counter:
        head_sparse_attention(*args)
    assert counter.get_total_flops() == 4 * T * Tk * 3 * d  # three active q heads: the padded one counts 0


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.int32, torch.uint8], ids=lambda dt: str(dt)[6:])
@pytest.mark.parametrize("case", ["decode-1", "prefill-gqa-pad"])
def test_kv_valid_as_0_1_integers(mask_dtype, case):
    """kv_valid may be 0/1 integers of any width instead of bool: the same keys are visible, so the
    kernel and the torch backend give the bool mask's output."""
    R, T, Tk, nkv, q_to_kv, pad = CASES[case]
    gen = generator("int mask", mask_dtype, case)
    q, k, v, q_to_kv, valid = _inputs(gen, torch.float32, R, T, Tk, nkv=nkv, nq=len(q_to_kv[0]), q_to_kv=q_to_kv,
                                      pad=pad)
    valid[0, Tk // 2] = False  # a hole inside row 0 too, not only left padding
    as_ints = valid.to(mask_dtype)
    scale = d ** -0.5
    want = head_sparse_attention_reference(q, k, v, q_to_kv, valid, scale)
    check(head_sparse_attention(q, k, v, q_to_kv, as_ints, scale), want, torch.float32)
    torch.testing.assert_close(head_sparse_attention(q, k, v, q_to_kv, as_ints, scale),
                               head_sparse_attention(q, k, v, q_to_kv, valid, scale), rtol=0, atol=0)
    torch_attention = get_backend("torch").attention
    torch.testing.assert_close(torch_attention(q, k, v, q_to_kv, as_ints, scale), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case,splits", [("prefill-gqa-pad", None), ("extend", None), ("decode-3", None),
                                         ("decode-3", 2)])
def test_keys_out_of_sight_may_score_far_higher(dtype, case, splits):
    """Keys a query must not see (left padding, the causal future) whose scores are far above every visible one's
    (a padded slot of the cache holding anything): they weigh nothing, and the visible keys keep their weights
    (a running maximum taken over hidden scores would round the visible weights to 0)."""
    R, T, Tk, nkv, q_to_kv, pad = CASES[case]
    gen = generator("loud hidden keys", dtype, case, splits)
    q, k, v, q_to_kv, valid = _inputs(gen, dtype, R, T, Tk, nkv=nkv, nq=len(q_to_kv[0]), q_to_kv=q_to_kv, pad=pad)
    if splits:
        k, v, valid = k.repeat(1, 1, 4, 1), v.repeat(1, 1, 4, 1), valid.repeat(1, 4)  # 280 keys: two splits
    hidden = ~valid  # left padding (and holes), and every key after the first query's own: its future
    hidden[:, k.shape[2] - T + 1:] = True  # (visible to later queries, where they rightly dominate)
    direction = q.float().mean(2).sum(1)  # [R, d]: keys along it score in the hundreds for every query head
    loud = (1000 * direction / direction.norm(dim=-1, keepdim=True))[:, None, None, :].to(dtype)
    k = torch.where(hidden[:, None, :, None], loud, k)
    o = _check(dtype, q, k, v, q_to_kv, valid, splits=splits)
    assert bool(o.isfinite().all())


@pytest.mark.parametrize("T", [1, 3, 37])
def test_head_dim_through_its_stride(T):
    """q, k and v whose head dim is not of unit stride (each stored with the head dim outermost of its last two),
    q_to_kv stored head by head, and kv_valid every other column of a wider mask whose columns between are False:
    read through their strides."""
    gen = generator("head dim stride", T)
    R, Tk, nq, nkv = 2, 45, 3, 2
    q = randn(R, T, d, nq, gen=gen).transpose(2, 3)
    k = randn(R, nkv, d, Tk, gen=gen).transpose(2, 3)
    v = randn(R, nkv, d, Tk, gen=gen).transpose(2, 3)
    assert q.stride(3) == nq and k.stride(3) == Tk and v.stride(3) == Tk
    q_to_kv = torch.tensor([[0, 1], [1, -1], [1, 0]], device=DEVICE).t()  # its head dim of stride 2
    assert q_to_kv.stride() == (1, 2)
    wide = torch.zeros(R, 2 * Tk, dtype=torch.bool, device=DEVICE)
    wide[:, ::2] = True
    valid = wide[:, ::2]
    valid[1, :6] = False
    _check(torch.float32, q, k, v, q_to_kv, valid)
