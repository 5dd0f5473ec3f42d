"""Shared plumbing of the Triton ops: a guarded Triton import, launch checks and autotune buckets.

Importing this module needs neither a GPU nor Triton: without Triton the kernels are stubs that
raise a clear error when called, and the PyTorch references keep working. Triton reads
``TRITON_INTERPRET`` when a kernel is decorated, so set it before importing ``adaptive_kernels``
to run the kernels on CPU tensors (slowly) in Triton's interpreter.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import threading

import torch
from torch._subclasses.fake_tensor import is_fake

from ..errors import ArgumentTypeError

try:
    import triton
    import triton.language as tl
except ImportError:  # the references still work; the Triton ops raise at call time
    triton = tl = None

HAS_TRITON = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels compute in
INDEX_DTYPES = (torch.int64, torch.int32)  # what index lists (rows, cols, q_to_kv) may hold


def jit(fn):
    """``triton.jit``, or a stub that raises at call time when Triton is missing."""
    if HAS_TRITON:
        return triton.jit(fn)
    return _Missing(fn.__name__)


# ADAPTIVE_KERNELS_AUTOTUNE=0: every launch takes its regime's first config, at most 2 stages deep
# (quick test runs)
AUTOTUNE = os.environ.get("ADAPTIVE_KERNELS_AUTOTUNE", "1") != "0"


def _bench(fn, quantiles):
    if torch.cuda.is_current_stream_capturing():  # do_bench synchronises, which would break the capture
        raise RuntimeError("a Triton kernel met a new shape inside a CUDA graph capture, where it cannot be tuned: "
                           "run the same request once before capturing it (within adaptive_kernels.graph_safe()), "
                           "its decode steps included")
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def autotune(configs, key):
    """``triton.autotune`` on CUDA; ``configs`` is a list of (kwargs, num_warps, num_stages), the
    first being the default. Under the interpreter or without Triton: the kernel itself; with autotuning
    off: the first config only."""
    def wrap(kernel):
        if not HAS_TRITON or INTERPRET:
            return kernel
        chosen = configs if AUTOTUNE else [(kw, w, min(s, 2)) for kw, w, s in configs[:1]]  # fits fp32 too
        return triton.autotune([triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in chosen], key=key,
                               do_bench=_bench)(kernel)
    return wrap


class _Missing:
    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise RuntimeError(f"the Triton kernel {self.name} needs the triton package, which is not installed; "
                           "use backend='torch' (the PyTorch references)")


def check_launch(op: str, *tensors: torch.Tensor) -> None:
    """Clear errors for what Triton cannot run: no Triton, CPU tensors outside the interpreter, mixed devices."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: the triton package is not installed; use backend='torch' (the PyTorch references)")
    check_one_device(op, tensors)
    device = tensors[0].device
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{op}: Triton kernels need CUDA tensors, got {device}; set TRITON_INTERPRET=1 before "
                         "importing adaptive_kernels to run them on the CPU, or use backend='torch'")


def finite_float(op: str, name: str, value, minimum: float = -math.inf) -> float:
    """``value``, a Python or NumPy real number, as a float: ``ArgumentTypeError`` for other types (a tensor,
    a bool), ``ValueError`` unless it is finite and at least ``minimum``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ArgumentTypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    if not minimum <= float(value) < math.inf:
        raise ValueError(f"{op}: {name} must be a finite number of at least {minimum}, got {value!r}")
    return float(value)


def check_one_device(op: str, tensors) -> None:
    """``ValueError`` naming the devices where ``tensors`` lie on more than one."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")


def check_tensors(op: str, optional: tuple[str, ...] = (), **arguments) -> None:
    """``ArgumentTypeError`` naming the first of ``arguments`` (name=value) that is not a tensor (those
    named in ``optional`` may be None), ``ValueError`` where the tensors lie on more than one device (a
    meta one among them would send the call to the custom op's fake kernel, which returns memory unset)."""
    for name, value in arguments.items():
        if not (isinstance(value, torch.Tensor) or (value is None and name in optional)):
            accepted = "a tensor or None" if name in optional else "a tensor"
            raise ArgumentTypeError(f"{op}: {name} must be {accepted}, got {type(value).__name__}")
    check_one_device(op, [value for value in arguments.values() if value is not None])


def call_directly(*tensors: torch.Tensor | None) -> bool:
    """Whether a public op may launch its kernel without going through its custom op.

    The custom op is what ``torch.compile``, dispatch modes (``FlopCounterMode``, fake tensors) and
    autograd see; in plain eager inference none of them is there, and the dispatcher's round trip
    through Python (about 17 us a call on a 2-core CPU, eight calls per layer) is pure host time.
    Meta tensors (shapes only) go through the custom op, to its fake kernel.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    grad = torch.is_grad_enabled()
    return not any(t is not None and (t.is_meta or (grad and t.requires_grad)) for t in tensors)


def differentiate_by_reference(op, reference) -> None:
    """Give the custom op ``op`` (or its name) the gradient of ``reference``, its PyTorch reference with the same
    arguments, recomputed in the backward pass. The kernels are forward only; training reaches them
    in the always-on prefix under a budget, and in every layer under a given plan."""
    def setup_context(ctx, inputs, output):
        ctx.tensor_at = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_at))
        ctx.others = [None if isinstance(v, torch.Tensor) else v for v in inputs]

    def backward(ctx, *grads):
        inputs = list(ctx.others)
        for i, t in zip(ctx.tensor_at, ctx.saved_tensors):
            inputs[i] = t
        wanted = [i for i in ctx.tensor_at if ctx.needs_input_grad[i]]
        with torch.enable_grad():
            for i in wanted:
                inputs[i] = inputs[i].detach().requires_grad_()
            out = reference(*inputs)
            pairs = [(o, g) for o, g in zip(out if isinstance(out, tuple) else (out,), grads)
                     if g is not None and o.requires_grad]  # an output made of no input (zeros) has no gradient
            found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                        allow_unused=True) if pairs else [None] * len(wanted)
        result = [None] * len(inputs)
        for i, g in zip(wanted, found):
            result[i] = g
        return tuple(result)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def active_count(index: torch.Tensor) -> int:
    """Entries of an index list that are not padding (``>= 0``), for FLOP formulas: counted from the
    values when the tensor holds some; a meta or fake tensor (shapes only) counts every entry."""
    if index.device.type == "meta" or is_fake(index):
        return index.numel()
    return int((index >= 0).sum())


def bucket(n: int) -> int:
    """The power of two at or above ``n`` (at least 1): a block size that covers ``n``, or a coarse
    autotune key, so sizes that differ a little reuse one tuning."""
    return 1 << max(0, int(n) - 1).bit_length()


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy when its last dimension is not of unit stride (what the kernels index)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``."""
    return -(-a // b)


# Triton's Autotuner keeps each call's arguments on itself (and clears them after), so two threads
# launching one autotuned kernel at once, one of them tuning, would read each other's
_AUTOTUNED_LAUNCH = threading.Lock()


# Triton's interpreter runs a kernel with triton.language patched and its grid in module-level state, so two
# threads interpreting kernels at once would read each other's
_INTERPRETED_LAUNCH = threading.Lock()


def run(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; under the interpreter, one launch at a time across threads."""
    if INTERPRET:
        with _INTERPRETED_LAUNCH:
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def launch(kernels: dict, fixed: dict, regime: str, grid, *args, **constexprs) -> None:
    """Launch ``kernels[regime]`` (autotuned; one thread at a time) on ``grid(meta)``; under the interpreter,
    the bare kernel with the block sizes ``fixed[regime]``."""
    if INTERPRET:
        run(kernels[regime], grid(fixed[regime]), *args, **constexprs, **fixed[regime])
    else:
        with _AUTOTUNED_LAUNCH:
            kernels[regime][grid](*args, **constexprs)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Multiprocessors of a CUDA device (a fixed 4 in the interpreter)."""
    if INTERPRET or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: full fp32 products for fp32 inputs, like the references."""
    return "ieee" if dtype == torch.float32 else "tf32"
