"""The public ops' shared plumbing: when they skip their custom op's dispatch (plain eager inference) and
when they must not, which arguments they refuse before anything runs, and small arithmetic helpers."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adaptive_kernels.errors import ArgumentTypeError
from adaptive_kernels.ops import _library
from adaptive_kernels.ops._library import bucket, call_directly, cdiv, dot_precision
from adaptive_kernels.ops.attention import head_sparse_attention, head_sparse_attention_reference
from adaptive_kernels.ops.norm import rms_norm
from adaptive_kernels.ops.projections import (gather_cols_linear, gather_cols_linear_reference, gather_rows_linear,
                                              gather_rows_linear_reference)
from adaptive_kernels.ops.rotary import rotary
from adaptive_kernels.ops.swiglu import gathered_swiglu, gathered_swiglu_reference


def test_direct_calls_only_where_nothing_watches_the_custom_op():
    x, w = torch.randn(2, 3), torch.nn.Parameter(torch.randn(4, 3))
    assert call_directly(x, None)
    assert not call_directly(x, w)  # autograd: through the op, whose backward is the reference's
    with torch.no_grad():
        assert call_directly(x, w)
        with FlopCounterMode(display=False):  # a dispatch mode counts only what reaches the dispatcher
            assert not call_directly(x)
    with torch.inference_mode():
        assert call_directly(x, w)
    assert not torch.compile(lambda t: torch.tensor(call_directly(t)), backend="eager", fullgraph=False)(x)


def test_bucket_is_the_smallest_power_of_two_at_or_above_n_and_at_least_1():
    """bucket(n) == min{2**k : 2**k >= max(n, 1)} for n in 0..4096."""
    for n in range(4097):
        want = 1
        while want < n:
            want *= 2
        assert bucket(n) == want, n


def test_cdiv_is_the_ceiling_of_the_quotient():
    """cdiv(a, b) == ceil(a / b) for a in 0..200, b in 1..32 (an exact quotient gives no extra 1)."""
    for a in range(201):
        for b in range(1, 33):
            assert cdiv(a, b) == math.ceil(a / b) == -(-a // b), (a, b)


def test_float32_dots_ask_for_ieee_products_and_half_ones_for_tensor_cores():
    """dot_precision's contract: 'ieee' (full fp32 products, as the references compute) for float32 inputs, 'tf32'
    (which tl.dot ignores for 16-bit inputs) otherwise. TF32 would keep 10 mantissa bits, about 1e-3 relative
    error, which Triton's interpreter does not model: on the CPU only the precision asked for shows it (the GPU
    check: test_swiglu's float32 product against float64)."""
    assert dot_precision(torch.float32) == "ieee"
    assert dot_precision(torch.float16) == dot_precision(torch.bfloat16) == "tf32"


def _valid_calls() -> dict:
    """Each public op with small valid arguments: name -> (op, tensor arguments by name, other arguments,
    the tensor arguments that may be None)."""
    g = torch.Generator().manual_seed(7)
    R, T, D, N, nq, nkv, d = 2, 3, 8, 6, 4, 2, 4
    x, rows = torch.randn(R, T, D, generator=g), torch.tensor([[0, 2, 5, -1], [1, 1, 3, 4]])
    return {
        "gather_rows_linear": (gather_rows_linear, dict(x=x, weight=torch.randn(N, D, generator=g), rows=rows,
                                                        bias=torch.randn(N, generator=g)), {}, ("bias",)),
        "gather_cols_linear": (gather_cols_linear, dict(a=torch.randn(R, T, 4, generator=g),
                                                        weight=torch.randn(D, N, generator=g), cols=rows), {}, ()),
        "gathered_swiglu": (gathered_swiglu, dict(x=x, w_gate=torch.randn(N, D, generator=g),
                                                  w_up=torch.randn(N, D, generator=g), rows=rows), {}, ("rows",)),
        "head_sparse_attention": (head_sparse_attention, dict(
            q=torch.randn(R, T, nq, d, generator=g), k=torch.randn(R, nkv, 5, d, generator=g),
            v=torch.randn(R, nkv, 5, d, generator=g), q_to_kv=torch.tensor([[0, 0, 1, -1], [1, 0, 1, 0]]),
            kv_valid=torch.tensor([[True] * 5, [False, True, True, True, True]])), dict(scale=0.5), ()),
        "rms_norm": (rms_norm, dict(x=x, weight=torch.randn(D, generator=g),
                                    residual=torch.randn(R, T, D, generator=g)), dict(eps=1e-6), ("residual",)),
        "rotary": (rotary, dict(x=torch.randn(R, T, nq, d, generator=g), cos=torch.randn(R, T, d, generator=g),
                                sin=torch.randn(R, T, d, generator=g)), {}, ()),
    }


@pytest.mark.parametrize("name,argument", [(name, argument) for name, (_, tensors, _, _) in _valid_calls().items()
                                           for argument in tensors])
def test_public_ops_refuse_an_argument_that_is_not_a_tensor_by_name(name, argument):
    """A list or NumPy array (and None where a tensor is required) ended in an AttributeError, or a misleading
    device error; gathered_swiglu took w_up=None for an ungated product and returned the gate projection."""
    op, tensors, others, optional = _valid_calls()[name]
    value = tensors[argument]
    for bad in [value.tolist(), value.numpy()] + ([] if argument in optional else [None]):
        with pytest.raises(ArgumentTypeError, match=f"{name}: {argument} must be a tensor"):
            op(**{**tensors, argument: bad}, **others)


@pytest.mark.parametrize("name,argument", [(name, argument) for name, (_, tensors, _, _) in _valid_calls().items()
                                           for argument in tensors])
def test_public_ops_refuse_tensors_on_two_devices(name, argument):
    """One argument on meta, the others on the CPU: the call went to the custom op's fake kernel, which gave back
    uninitialised CPU memory as the result."""
    op, tensors, others, _ = _valid_calls()[name]
    with pytest.raises(ValueError, match=rf"{name}: all tensors must be on one device, got \['cpu', 'meta'\]"):
        op(**{**tensors, argument: tensors[argument].to("meta")}, **others)


def test_the_swiglu_custom_op_refuses_a_missing_up_weight():
    """torch.ops passes None on for the op's non-optional w_up: it was read as an ungated product."""
    _, tensors, _, _ = _valid_calls()["gathered_swiglu"]
    with pytest.raises(ArgumentTypeError, match="gathered_swiglu: w_up must be a tensor"):
        torch.ops.adaptive_kernels.gathered_swiglu(tensors["x"], tensors["w_gate"], None, tensors["rows"])


@pytest.mark.parametrize("name", list(_valid_calls()))
def test_public_ops_without_the_triton_package_point_to_the_torch_backend(monkeypatch, name):
    """Where triton is missing (pip installs it on Linux only), each op says so by name rather than failing in its
    launch."""
    monkeypatch.setattr(_library, "HAS_TRITON", False)
    op, tensors, others, _ = _valid_calls()[name]
    with pytest.raises(RuntimeError, match=re.escape(f"{name}: the triton package is not installed; use "
                                                     "backend='torch' (the PyTorch references)")):
        op(**tensors, **others)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(_valid_calls()))
def test_public_ops_on_meta_tensors_give_the_shapes_of_a_real_call(name, dtype):
    """Meta tensors go to the custom op's fake kernel (they reached the Triton launch and failed there), which
    gives the real call's shapes and dtypes."""
    op, tensors, others, _ = _valid_calls()[name]
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    real = op(**tensors, **others)
    meta = op(**{k: v.to("meta") for k, v in tensors.items()}, **others)
    for got, want in zip(meta if isinstance(meta, tuple) else (meta,), real if isinstance(real, tuple) else (real,)):
        assert got.is_meta and (got.shape, got.dtype) == (want.shape, want.dtype)


@pytest.mark.triton
def test_cpu_tensors_outside_the_interpreter_are_refused_naming_the_way_out():
    """Without TRITON_INTERPRET a Triton op on CPU tensors is refused by name (it failed deep in Triton's launch),
    pointing to the interpreter and to the torch backend."""
    code = ("import torch; from adaptive_kernels.ops.projections import gather_rows_linear; "
            "gather_rows_linear(torch.randn(1, 2, 8), torch.randn(4, 8), torch.tensor([[0, 2]]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and ("ValueError: gather_rows_linear: Triton kernels need CUDA tensors, got cpu; "
                                     "set TRITON_INTERPRET=1") in done.stderr, done.stderr[-2000:]
    assert "backend='torch'" in done.stderr


@pytest.mark.triton
def test_attention_with_no_key_value_head_has_zero_gradients():
    """With no kv head every output is 0 and made of no input: backward failed on its missing graph."""
    q = torch.randn(2, 3, 4, 8, requires_grad=True)
    k = v = torch.randn(2, 0, 5, 8)
    out = head_sparse_attention(q, k, v, torch.full((2, 4), -1), torch.ones(2, 5, dtype=torch.bool), 0.5)
    assert torch.equal(out, torch.zeros_like(out))
    (grad,) = torch.autograd.grad(out.sum(), q, materialize_grads=True)  # None (no gradient) as zeros
    assert torch.equal(grad, torch.zeros_like(q))


INDEX_ARGUMENTS = {"gather_rows_linear": ("rows", gather_rows_linear_reference),
                   "gather_cols_linear": ("cols", gather_cols_linear_reference),
                   "gathered_swiglu": ("rows", gathered_swiglu_reference),
                   "head_sparse_attention": ("q_to_kv", head_sparse_attention_reference)}


@pytest.mark.triton
@pytest.mark.parametrize("name", list(INDEX_ARGUMENTS))
def test_int32_index_lists_give_what_the_reference_gives_for_int64(name):
    """Index lists may be int32 (INDEX_DTYPES); the package itself always passes int64."""
    op, tensors, others, _ = _valid_calls()[name]
    index, reference = INDEX_ARGUMENTS[name]
    assert tensors[index].dtype == torch.int64
    want = reference(**tensors, **others)
    got = op(**{**tensors, index: tensors[index].to(torch.int32)}, **others)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


AUTOTUNE_RACE = """
import threading, time
from adaptive_kernels.ops import _library, projections

tuner = projections._ROWS["gemv"]  # Triton's Autotuner, shared by every thread and model


class NoGpu:  # the launch and do_bench a GPU would run; each sleep lets the other thread in, as a GPU wait does
    def run(self, *args, **kwargs):
        time.sleep(0.0005)


def bench(kernel_call, quantiles):
    for _ in range(5):
        kernel_call()
        time.sleep(0.002)
    return [1.0, 1.0, 1.0]


tuner.fn = NoGpu()
tuner.__dict__["do_bench"] = bench
names = tuner.arg_names


def call(n_bucket):
    values = dict.fromkeys(names, 0) | {"T_BUCKET": 1, "N_BUCKET": n_bucket, "D": 4096}
    args = [values[n] for n in names[:names.index("HAS_BIAS")]]
    _library.launch(projections._ROWS, projections._INTERPRET_ROWS, "gemv", lambda meta: (1,), *args,
                    HAS_BIAS=False, GATED=True, PREC="tf32")


call(4096)  # tuned before, as an earlier request would
errors = []


def run(calls):
    try:
        for n_bucket in calls:
            call(n_bucket)
            time.sleep(0.001)  # the host's work between launches
    except Exception as error:
        errors.append(repr(error))


threads = [threading.Thread(target=run, args=([16384],)), threading.Thread(target=run, args=([4096] * 200,))]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("errors:", errors)
"""


def test_threads_launching_one_autotuned_kernel_take_turns():
    """Triton's Autotuner keeps a call's arguments on itself: one thread tuning a new shape while another launches
    the same kernel (no GPU here: launches and timings sleep, releasing the GIL as GPU waits do) must not read the
    other's. Run with the interpreter off, so that the package's kernels are autotuned."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "ADAPTIVE_KERNELS_AUTOTUNE": "1"}
    done = subprocess.run([sys.executable, "-c", AUTOTUNE_RACE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("errors: []"), done.stdout + done.stderr


def test_no_kernel_is_tuned_inside_a_cuda_graph_capture(monkeypatch):
    """Tuning times the kernel, which synchronises and would break the capture: refused with what to do instead."""
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"inside a CUDA graph capture.*run the same request once before"):
        _library._bench(lambda: None, None)


@pytest.mark.triton
@pytest.mark.parametrize("name", list(INDEX_ARGUMENTS))
@pytest.mark.parametrize("dtype", [torch.int16, torch.int8, torch.uint8], ids=str)
def test_index_lists_of_a_narrower_integer_dtype_are_refused_by_name(name, dtype):
    """Only int64 and int32 index lists are taken (INDEX_DTYPES): a narrower integer type is refused by name before
    anything runs (uint8 cannot even hold the -1 padding: it becomes 255, a row the kernel would read past N)."""
    op, tensors, others, _ = _valid_calls()[name]
    index = INDEX_ARGUMENTS[name][0]
    refusal = rf"{name}: {index} must be int64 \(or int32\), got {dtype}"
    with pytest.raises(ArgumentTypeError, match=refusal):
        op(**{**tensors, index: tensors[index].to(dtype)}, **others)
