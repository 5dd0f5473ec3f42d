"""End-to-end latency versus budget: vision tower, prefill and per-token decode of a patched LLaVA.

For variants L and H, budgets 1.0 down to 0.5 and each backend, it times the patched model next to stock
transformers (eager, fed the prompt; on CUDA also its decode with a static cache and torch.compile), the
ideal (a stock model already cut to the plan; where key/value heads are shared, as in the CPU's tiny
model but not the 7B's, it keeps every query head of a kept key/value head, so for variant H it can be
larger than the plan) and the masked computation (stock transformers with hooks: every weight read,
skipped units multiplied by 0), these two fed the prompt and the latency token. It writes CSV and JSON
rows under ``benchmarks/results/`` and draws latency versus budget with the ideal line (latency at 1.0
times the plan's cost). On a CUDA device it uses a LLaVA-1.5-7B-shaped random model in bf16; on the CPU
the built-in tiny one.
"""

from __future__ import annotations

import json
import math
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from . import ExecutionPlan, latency_embedding, patch, plan, unpatch
from .backends import BACKENDS, check_backends
from .errors import refusal
from .measuring import (copy_bandwidth, cpu_threads, default_dtype, device_name, graph_replay_ms, kernel_ms,
                        make_out_dir, matmul_rate, median_timer, pyplot, run_stamp, whole_file, write_csv)
from .models import text_model_shape
from .models.llama import plan_from_masks
from .plan import PAPER_RANK, VARIANTS, check_positive_integer, listed_schedule, resolve_budgets
from .models.llava import prompt_embeddings
from .sliced import mask_hooks, sliced_stock
from .tiny import TINY_RANK, example_inputs, tiny_llava

BUDGETS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
REFERENCE_COLORS = {"L": "black", "H": "tab:brown"}  # the stock references of each variant's plans, in the plot


def llava_7b_config() -> LlavaConfig:
    """LLaVA-1.5-7B's shapes: CLIP ViT-L/14 at 336 px (576 image tokens), Vicuna-7B decoder."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def model_name(device: str) -> str:
    """The name of the sweep's model on ``device``: 7B-shaped on CUDA, tiny on the CPU."""
    return "llava-1.5-7b-shaped" if device == "cuda" else "tiny"


def output_files(device: str) -> list[str]:
    """The files a sweep on ``device`` writes: rows (CSV, JSON), adherence, target ratios (``write_records``), plot."""
    stem = f"sweep-{model_name(device)}"
    return [stem + suffix for suffix in (".csv", ".json", "-adherence.json", "-targets.json", ".png")]


def build_model(device: str, dtype: torch.dtype):
    """The sweep's model, its name (``model_name``) and the H rank it is patched with: 7B-shaped on CUDA
    (initialised on the device) at the paper's rank, tiny on the CPU."""
    if device == "cuda":
        with torch.device("cuda"), torch.random.fork_rng(devices=[0]):
            torch.manual_seed(0)
            model = LlavaForConditionalGeneration(llava_7b_config()).to(dtype).eval()
        return model, model_name(device), PAPER_RANK
    return tiny_llava().to(dtype), model_name(device), TINY_RANK


@dataclass
class Row:
    model: str
    system: str  # adaptive | stock | stock-static-compiled | ideal | masked
    variant: str
    backend: str
    budget: float
    cost: float
    vision_ms: float
    prefill_ms: float
    device: str
    dtype: str
    rank: int
    new_tokens: int
    repeats: int
    torch: str
    transformers: str
    triton: str
    date: str
    decode_ms_per_token: float = float("nan")  # steady state: decode steps after the first two
    decode_setup_ms: float = float("nan")  # per request, what the first two decode steps cost beyond that (a
    # difference of medians: negative where setup costs less than the timings' noise, as on the CPU)
    prefill_kernel_ms: float = float("nan")  # sum of GPU kernel times of one prefill (torch.profiler)
    decode_kernel_ms: float = float("nan")  # sum of GPU kernel times per decode token, steady state (adaptive rows)
    schedule_ms: float = float("nan")  # latency encoder, scheduler head, top-n and index buffers, per request
    decode_floor_ms: float = float("nan")  # the bytes a decode step must read, at the measured copy bandwidth
    decode_weight_floor_ms: float = float("nan")  # its active weights alone (no cached keys, values)
    prefill_floor_ms: float = float("nan")  # the FLOPs a prefill must do, at the measured matrix-product rate
    prefill_graph_ms: float = float("nan")  # one prefill captured as a CUDA graph and replayed (adaptive rows:
    # the latency token, scheduler, plan and every layer inside, on fixed-width plan buffers)


def _schedule(model, budget: float, seq_len: int):
    """The per-request scheduling work: latency token, scheduler head, top-n, index buffers."""
    lm = model.model.language_model
    settings, scheduler = lm._ak_settings, lm.latency_scheduler
    token = scheduler.latency_embedding([budget])
    masks = scheduler.select(token, [budget])  # the token's embedding stands in for its hidden state
    return listed_schedule(plan_from_masks(*masks, settings, seq_len), settings.shape, model.device)


def prefill_floor_ms(model, execution_plan: ExecutionPlan, seq_len: int, rate: float) -> float:
    """The least time a prefill of row 0 of ``execution_plan`` over ``seq_len`` tokens can take: ms to do,
    at ``rate`` (FLOPs per second), its executed layers' FLOPs (``DecoderShape.layer_flops``, attention
    over the causal pairs only) and lm_head's over every position (a forward returns every logit)."""
    shape = text_model_shape(model)
    plan_flops = shape.layer_flops(execution_plan.heads[0].cpu(), execution_plan.groups[0].cpu(), seq_len, causal=True)
    decoder = (plan_flops * execution_plan.layers[0].cpu()).sum().item()
    return (decoder + 2 * seq_len * shape.hidden_size * model.lm_head.weight.shape[0]) / rate * 1e3


def decode_floor_ms(model, execution_plan: ExecutionPlan, cached: int, bandwidth: float) -> float:
    """The least time a decode step of row 0 of ``execution_plan`` can take: ms to read, at ``bandwidth``
    (bytes per second), its decoder bytes (``DecoderShape.decode_bytes`` with ``cached`` positions) and
    the final norm and lm_head weights."""
    shape, weight = text_model_shape(model), model.lm_head.weight
    masks = (execution_plan.layers[0].cpu(), execution_plan.heads[0].cpu(), execution_plan.groups[0].cpu())
    decoder = shape.decode_bytes(*masks, cached=cached, element_size=weight.element_size()).sum().item()
    return (decoder + (weight.numel() + shape.hidden_size) * weight.element_size()) / bandwidth * 1e3


def steady_per_token(longer: float, three: float, new_tokens: int) -> float:
    """A decode token's steady-state cost from the costs of generating ``new_tokens + 3`` tokens and 3:
    ``(longer - three) / new_tokens``; NaN where that is not positive (the noise exceeded n steps, and a
    time per token of 0 or less measures nothing)."""
    per_token = (longer - three) / new_tokens
    return per_token if per_token > 0 else float("nan")


def decode_timing(generate, new_tokens: int, median_ms, repeats: int) -> tuple[float, float]:
    """(ms per token in the steady state, per-request setup ms) of ``generate(n)`` producing n tokens.

    The first new token comes from prefill; the next two are the decode steps that may run eagerly
    and capture a CUDA graph. Steady state: ``steady_per_token(t(n + 3), t(3), n)``; setup: what the two
    decode steps after prefill cost beyond two steady ones, ``t(3) - t(1) - 2 * per_token``. Both NaN where
    the steady state is.
    """
    one, three = median_ms(lambda: generate(1), repeats), median_ms(lambda: generate(3), repeats)
    per_token = steady_per_token(median_ms(lambda: generate(new_tokens + 3), repeats), three, new_tokens)
    return per_token, three - one - 2 * per_token


def _compiled_stock_decode(model, embeds, mask, new_tokens, median_ms, repeats) -> tuple[float, float]:
    """Stock transformers decode with a static cache, auto-compiled by ``generate`` (CUDA): ``decode_timing``."""
    gen = dict(inputs_embeds=embeds, attention_mask=mask, do_sample=False, cache_implementation="static",
               max_cache_len=embeds.shape[1] + new_tokens + 8)
    return decode_timing(lambda n: model.generate(**gen, max_new_tokens=n, min_new_tokens=n), new_tokens,
                         median_ms, repeats)


class SweepIncomplete(RuntimeError):
    """Some measurements of a sweep failed: ``failures`` names each failed job (variant, backend and
    budget, or compiled stock) with its error; ``rows`` holds the others, written and plotted as in a
    complete run."""

    def __init__(self, rows: list[Row], failures: list[str]):
        self.rows, self.failures = rows, failures
        super().__init__(f"{len(failures)} measurement(s) of the sweep failed (tracebacks above): " + "; ".join(failures))


def sweep(device: str | None = None, variants=("L", "H"), backends=None, budgets=BUDGETS, new_tokens: int = 16,
          repeats: int = 3, out_dir: str | Path = "benchmarks/results", progress: bool = True,
          threads: int | None = None):
    """Run the sweep; returns the rows. Each row is written to ``out_dir`` (CSV, JSON) as soon as it is
    measured; the plot (PNG) is drawn at the end. A measurement that fails (one variant, backend and
    budget, or compiled stock) prints its traceback and the sweep goes on: one broken path costs only
    its own rows. Then ``SweepIncomplete`` is raised at the end, after the plot. ``threads``: torch's CPU
    threads meanwhile (None: 1 on the CPU, where the tiny model's timings are otherwise contention noise;
    torch's default on CUDA). Bad arguments are refused up front (``_check_arguments``, ``make_out_dir``)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    budgets = _check_arguments(device, variants, backends, budgets, new_tokens, repeats, threads)
    make_out_dir("out_dir", out_dir, output_files(device))
    with cpu_threads(threads if threads is not None or device == "cuda" else 1):
        return _sweep(device, variants, backends, budgets, new_tokens, repeats, out_dir, progress)


def _check_arguments(device, variants, backends, budgets, new_tokens: int, repeats: int, threads) -> list[float]:
    """``budgets`` as Python floats, as ``resolve_budgets`` reads them (a numpy float32 0.6 is 0.6), so that rows
    hold plain numbers. ``ValueError`` naming the argument unless ``device`` is "cpu" or "cuda" (one torch sees),
    ``variants`` a non-empty list or tuple of distinct names from ``VARIANTS``, ``backends`` None or such a list of
    names from ``BACKENDS`` that can run the sweep's model on ``device``, ``budgets`` a non-empty list or tuple of
    distinct budgets in (0, 1], ``new_tokens`` and ``repeats`` positive integers, and ``threads`` None or a
    positive integer (``ArgumentTypeError``, a ``ValueError`` too, for a value of another type)."""
    if device not in ("cpu", "cuda"):
        raise refusal(isinstance(device, str))(f"device must be 'cpu', 'cuda' or None, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda', but torch sees no CUDA device")
    _check_names("variants", variants, VARIANTS)
    if backends is not None:
        _check_names("backends", backends, BACKENDS)
        check_backends("backends", backends, torch.device(device), default_dtype(device))
    if not isinstance(budgets, (list, tuple)) or not budgets:
        raise refusal(isinstance(budgets, (list, tuple)))(
            f"budgets must be a non-empty list or tuple of floats in (0, 1], got {budgets!r}")
    resolved = resolve_budgets(budgets, len(budgets), "budgets")
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"budgets must be distinct, got {budgets!r}")
    check_positive_integer("new_tokens", new_tokens)
    check_positive_integer("repeats", repeats)
    if threads is not None:
        check_positive_integer("threads", threads)
    return resolved


def _check_names(name: str, values, accepted: tuple) -> None:
    """``ValueError`` naming ``name`` unless ``values`` is a non-empty list or tuple of distinct names from
    ``accepted``."""
    if (not isinstance(values, (list, tuple)) or not values or not all(v in accepted for v in values)
            or len(set(values)) < len(values)):
        raise refusal(isinstance(values, (list, tuple)))(
            f"{name} must be a non-empty list or tuple of distinct names from {accepted}, got {values!r}")


COMPILED_STOCK = "stock-static-compiled"
"""The job of ``job_order`` that times compiled stock's decode (CUDA), beside the plans' (variant, backend, budget)."""


def job_order(device: str, variants, backends, budgets) -> list:
    """The sweep's jobs in the order run: each backend's plans budget by budget, every variant at a budget before
    the next budget, the first backend first; on CUDA ``COMPILED_STOCK`` (compiling takes a while) after the first
    budget. A run cut off by its time limit still has the comparisons at the first budget (1.0 by default), and
    then every variant at each budget it reached."""
    jobs = [(variant, backend, budget) for backend in backends for budget in budgets for variant in variants]
    if device != "cuda":
        return jobs
    return jobs[:len(variants)] + [COMPILED_STOCK] + jobs[len(variants):]


def _sweep(device, variants, backends, budgets, new_tokens, repeats, out_dir, progress):
    """``sweep`` past its checks: the stock row, then every job of ``job_order``, then the plot; the rows, or
    ``SweepIncomplete`` where a job failed."""
    from tqdm.auto import tqdm

    backends = backends or (("triton", "torch") if device == "cuda" else ("torch",))
    with torch.no_grad():
        run = _SweepRun(device, new_tokens, repeats, out_dir)
        run.measure_stock()
        for job in tqdm(job_order(device, variants, backends, budgets), desc="sweep", disable=not progress):
            if job == COMPILED_STOCK:
                run.attempt(job, run.measure_compiled_stock)
            else:  # the stock references of each plan once, with its first backend
                run.attempt(" ".join(map(str, job)), run.measure_plan, *job, job[1] == backends[0])
    plot_rows(run.rows, Path(out_dir) / f"{run.stem}.png")
    if run.failures:
        raise SweepIncomplete(run.rows, run.failures)
    return run.rows


class _SweepRun:
    """One sweep's model (``build_model``), prompt, timers and hardware rates, and what it has measured: ``rows``,
    each written as measured (an interrupted run keeps them), and ``failures``, each job's that failed."""

    def __init__(self, device: str, new_tokens: int, repeats: int, out_dir):
        dtype = default_dtype(device)
        self.model, name, self.rank = build_model(device, dtype)
        self.device, self.new_tokens, self.repeats, self.out_dir = device, new_tokens, repeats, out_dir
        self.stem = f"sweep-{name}"
        inputs = example_inputs(self.model, batch_size=1, text_tokens=64 if device == "cuda" else 12)
        self.median_ms = median_timer(device)
        self.stamp = dict(model=name, device=device_name(device), dtype=str(dtype).removeprefix("torch."),
                          rank=self.rank, new_tokens=new_tokens, repeats=repeats, **run_stamp())
        self.vision_ms = self.median_ms(lambda: self.model.model.get_image_features(pixel_values=inputs["pixel_values"]),
                                        repeats)
        self.embeds, self.mask = prompt_embeddings(self.model, inputs), inputs["attention_mask"]
        self.bandwidth, self.rate = copy_bandwidth(device), matmul_rate(device, dtype)
        self.rows: list[Row] = []
        self.failures: list[str] = []

    def record(self, **fields) -> None:
        """A row of ``fields`` with the run's vision time and stamp, written at once."""
        self.rows.append(Row(vision_ms=self.vision_ms, **fields, **self.stamp))
        write_records(self.rows, self.out_dir, self.stem)

    def attempt(self, name: str, job, *args) -> None:
        """``job(*args)``; where it fails, its traceback is printed, the failure is named ``name`` in ``failures``,
        and the model is unpatched (stock again for the next job; a no-op where the failure left it stock)."""
        try:
            job(*args)
        except Exception as error:
            traceback.print_exc()
            self.failures.append(f"{name}: {type(error).__name__}: {error}")
            unpatch(self.model)

    def floors(self, execution_plan: ExecutionPlan, tokens: int) -> dict:
        """The floor fields of a Row for row 0 of ``execution_plan`` run over ``tokens`` positions: decode's with
        those cached and with its weights alone, prefill's (``decode_floor_ms``, ``prefill_floor_ms``)."""
        return dict(decode_floor_ms=decode_floor_ms(self.model, execution_plan, tokens, self.bandwidth),
                    decode_weight_floor_ms=decode_floor_ms(self.model, execution_plan, 0, self.bandwidth),
                    prefill_floor_ms=prefill_floor_ms(self.model, execution_plan, tokens, self.rate))

    def prefill_times(self, m, embeds, mask, graph: str | None = None, **kw) -> dict:
        """The prefill fields of a Row for ``m(inputs_embeds=embeds, attention_mask=mask, **kw)``: its wall time; on
        CUDA its GPU kernel time and, given a ``graph`` name, its replay as one CUDA graph (the prompt unpadded: no
        mask; a capture that fails is a failure named ``graph``, the other timings kept). NaN where not measured."""
        def prefill():
            return m(inputs_embeds=embeds, attention_mask=mask, **kw)

        nan = float("nan")
        times = dict(prefill_ms=self.median_ms(prefill, self.repeats), prefill_kernel_ms=nan, prefill_graph_ms=nan)
        if self.device != "cuda":
            return times
        times["prefill_kernel_ms"] = kernel_ms(prefill)
        if graph is not None:
            try:
                times["prefill_graph_ms"] = graph_replay_ms(lambda: m(inputs_embeds=embeds, **kw), self.median_ms,
                                                            self.repeats)
            except Exception as error:
                traceback.print_exc()
                self.failures.append(f"{graph} prefill as a CUDA graph: {type(error).__name__}: {error}")
        return times

    def decode_times(self, m, embeds, mask, kernels: bool = False, **kw) -> dict:
        """The decode fields of a Row for ``m.generate`` from ``embeds``: wall ms per token in the steady state and
        per-request setup (``decode_timing``); on CUDA with ``kernels`` the GPU kernel time per token
        (``steady_per_token`` of kernel times: a failure there costs that time only). NaN where not measured."""
        gen = dict(inputs_embeds=embeds, attention_mask=mask, do_sample=False, **kw)

        def generate(n: int):
            return m.generate(**gen, max_new_tokens=n, min_new_tokens=n)

        per_token, setup = decode_timing(generate, self.new_tokens, self.median_ms, self.repeats)  # warms up first
        times = dict(decode_ms_per_token=per_token, decode_setup_ms=setup, decode_kernel_ms=float("nan"))
        if self.device == "cuda" and kernels:
            try:
                times["decode_kernel_ms"] = steady_per_token(kernel_ms(lambda: generate(self.new_tokens + 3)),
                                                             kernel_ms(lambda: generate(3)), self.new_tokens)
            except Exception as error:
                traceback.print_exc()
                self.failures.append(f"decode kernel time: {type(error).__name__}: {error}")
        return times

    def measure_stock(self) -> None:
        """Stock transformers (eager) fed the prompt, with the full model's floors."""
        shape = text_model_shape(self.model)
        full = ExecutionPlan.full(1, shape.num_layers, shape.num_heads)
        self.record(system="stock", variant="-", backend="transformers", budget=1.0, cost=1.0,
                    **self.floors(full, self.embeds.shape[1]),
                    **self.prefill_times(self.model, self.embeds, self.mask, graph="stock"),
                    **self.decode_times(self.model, self.embeds, self.mask))

    def measure_compiled_stock(self) -> None:
        """Stock transformers' decode with a static cache and torch.compile (``_compiled_stock_decode``)."""
        per_token, setup = _compiled_stock_decode(self.model, self.embeds, self.mask, self.new_tokens, self.median_ms,
                                                  self.repeats)
        self.record(system=COMPILED_STOCK, variant="-", backend="transformers", budget=1.0, cost=1.0,
                    prefill_ms=float("nan"), decode_ms_per_token=per_token, decode_setup_ms=setup)

    def measure_plan(self, variant: str, backend: str, budget: float, references: bool) -> None:
        """The adaptive row of ``variant`` patched with ``backend`` at ``budget``, its floors those of its plan over
        the prompt and the latency token; with ``references`` also the plan's stock references
        (``measure_references``)."""
        model, tokens = self.model, self.embeds.shape[1] + 1
        patch(model, variant, rank=self.rank, backend=backend)
        p = plan(model, latency_budget=budget, inputs_embeds=self.embeds, attention_mask=self.mask)
        latency_token = latency_embedding(model, budget)[None, None].to(self.embeds.dtype)
        times = {**self.prefill_times(model, self.embeds, self.mask, graph=f"{variant} {backend} {budget}",
                                      latency_budget=budget),
                 **self.decode_times(model, self.embeds, self.mask, kernels=True, latency_budget=budget)}
        schedule = self.median_ms(lambda: _schedule(model, budget, tokens), self.repeats)
        self.record(system="adaptive", variant=variant, backend=backend, budget=budget, cost=float(p.cost()[0]),
                    schedule_ms=schedule, **self.floors(p, tokens), **times)
        unpatch(model)
        if references:
            self.measure_references(variant, budget, p, latency_token)

    def measure_references(self, variant: str, budget: float, execution_plan: ExecutionPlan, latency_token) -> None:
        """The stock references of ``execution_plan`` (``variant``'s at ``budget``), fed the prompt and
        ``latency_token`` [1, 1, D]: the masked computation, and the ideal, a prefill reference with the plan's
        prefill floor."""
        model, cost = self.model, float(execution_plan.cost()[0])
        embeds = torch.cat([self.embeds, latency_token], 1)
        mask = torch.cat([self.mask, self.mask[:, :1]], 1)
        handles = mask_hooks(model, execution_plan)
        try:
            times = {**self.prefill_times(model, embeds, mask), **self.decode_times(model, embeds, mask)}
        finally:
            for handle in handles:
                handle.remove()
        self.record(system="masked", variant=variant, backend="transformers", budget=budget, cost=cost, **times)
        ideal = sliced_stock(model, execution_plan, 0)
        self.record(system="ideal", variant=variant, backend="transformers", budget=budget, cost=cost,
                    prefill_floor_ms=prefill_floor_ms(model, execution_plan, embeds.shape[1], self.rate),
                    **self.prefill_times(ideal, embeds, mask, graph=f"ideal {variant} {budget}"))


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN where ``b`` is 0 (a timer that saw nothing): one bad timing must not stop the sweep."""
    return a / b if b else float("nan")


def budget_adherence(rows: list[Row]) -> list[dict]:
    """Per variant, backend and phase (prefill wall time, prefill as a CUDA graph, decode per token, and the
    GPU kernel times of prefill and decode, each where measured): latency at each budget over latency at 1.0,
    minus the plan's cost.

    A positive excess means the budget bought less speed than its share of FLOPs promised; the
    row reports the largest excess and the budget where it occurs, over the budgets below 1.0 measured
    (1.0's excess is 0 by construction; NaN and None where none is).
    """
    result = []
    adaptive = [r for r in rows if r.system == "adaptive"]
    for variant, backend in sorted({(r.variant, r.backend) for r in adaptive}):
        series = [r for r in adaptive if (r.variant, r.backend) == (variant, backend)]
        full = next((r for r in series if r.budget == 1.0), None)
        if full is None:
            continue
        for phase in ("prefill_ms", "prefill_kernel_ms", "prefill_graph_ms", "decode_ms_per_token", "decode_kernel_ms"):
            if math.isnan(getattr(full, phase)):  # not measured here (kernel times: CUDA only)
                continue
            excesses = [(ratio(getattr(r, phase), getattr(full, phase)) - r.cost, r.budget) for r in series
                        if r.budget != 1.0]
            measured = [e for e in excesses if not math.isnan(e[0])]  # NaN: not measured, or a 0 at 1.0
            excess, budget = max(measured) if measured else (float("nan"), None)
            result.append({"variant": variant, "backend": backend, "phase": phase.removesuffix("_ms_per_token").removesuffix("_ms"),
                           "largest_excess": excess, "at_budget": budget})
    return result


TARGETS = {"prefill_vs_ideal": ("prefill/ideal", 1.05), "prefill_kernel_vs_ideal": ("kernels/ideal", 1.05),
           "prefill_graph_vs_ideal": ("graph/ideal", 1.05),
           "decode_vs_floor": ("decode/floor", 1.3), "decode_vs_weight_floor": ("decode/weights", 1.3),
           "schedule_share_of_prefill": ("sched/prefill", 0.02),
           "schedule_share_of_prefill_kernels": ("sched/kernels", 0.02),
           "decode_vs_compiled_stock": ("decode/compiled", 1.0)}
"""``target_ratios``' ratios: a short label each, and the upper bound the speed targets set."""


def target_ratios(rows: list[Row]) -> list[dict]:
    """Per adaptive row, the ratios ``TARGETS`` bounds: prefill (wall, GPU kernel time, graph replay) over the ideal's
    (a stock model cut to the same plan), decode per token over its floor and over its active weights' alone,
    scheduling over prefill's wall time and over its GPU kernel time, and at budget 1.0 decode per token over
    compiled stock's; NaN where a part was not measured."""
    nan = float("nan")
    ideal = {(r.variant, r.budget): r for r in rows if r.system == "ideal"}
    compiled = next((r for r in rows if r.system == "stock-static-compiled"), None)
    result = []
    for r in rows:
        if r.system != "adaptive":
            continue
        i = ideal.get((r.variant, r.budget))
        result.append({
            "variant": r.variant, "backend": r.backend, "budget": r.budget,
            "prefill_vs_ideal": ratio(r.prefill_ms, i.prefill_ms) if i else nan,
            "prefill_kernel_vs_ideal": ratio(r.prefill_kernel_ms, i.prefill_kernel_ms) if i else nan,
            "prefill_graph_vs_ideal": ratio(r.prefill_graph_ms, i.prefill_graph_ms) if i else nan,
            "decode_vs_floor": ratio(r.decode_ms_per_token, r.decode_floor_ms),
            "decode_vs_weight_floor": ratio(r.decode_ms_per_token, r.decode_weight_floor_ms),
            "schedule_share_of_prefill": ratio(r.schedule_ms, r.prefill_ms),
            "schedule_share_of_prefill_kernels": ratio(r.schedule_ms, r.prefill_kernel_ms),
            "decode_vs_compiled_stock": (ratio(r.decode_ms_per_token, compiled.decode_ms_per_token)
                                         if compiled is not None and r.budget == 1.0 else nan)})
    return result


def targets_table(ratios: list[dict]) -> str:
    """``target_ratios`` as a table, one line per adaptive row; a ratio above its bound is marked ``!``."""
    lines = [f"{'ratio (bound)':18}" + "".join(f"{f'{label} ({bound})':>21} " for label, bound in TARGETS.values())]
    for r in ratios:
        cells = "".join(f"{r[name]:21.3f}{'!' if r[name] > bound else ' '}" for name, (_, bound) in TARGETS.items())
        lines.append(f"{r['variant']} {r['backend']:7} {r['budget']!r:<8}{cells}")
    return "\n".join(lines)


def adherence_table(adherence: list[dict]) -> str:
    """``budget_adherence`` records as lines, one per variant, backend and phase."""
    return "\n".join(f"adherence {a['variant']} {a['backend']} {a['phase']}: largest excess of latency share over "
                     f"cost {a['largest_excess']:+.3f} at budget {a['at_budget']}" for a in adherence)


def report(rows: list[Row]) -> str:
    """The rows as a table (with prefill's GPU kernel time over its FLOP floor), then their budget adherence
    (``adherence_table``) and their target ratios (``targets_table``)."""
    lines = [f"{'system':22} {'var':3} {'backend':12} {'budget':>6} {'cost':>5} {'prefill ms':>10} "
             f"{'kernels/floor':>13} {'decode ms/tok':>13} {'setup ms':>9} {'sched ms':>9}"]
    lines += [f"{r.system:22} {r.variant:3} {r.backend:12} {r.budget!r:>6} {r.cost:5.2f} {r.prefill_ms:10.2f} "
              f"{ratio(r.prefill_kernel_ms, r.prefill_floor_ms):13.2f} {r.decode_ms_per_token:13.2f} "
              f"{r.decode_setup_ms:9.2f} {r.schedule_ms:9.2f}" for r in rows]
    return "\n".join(lines + [adherence_table(budget_adherence(rows)), targets_table(target_ratios(rows))])


def write_records(rows: list[Row], out_dir, stem: str) -> None:
    """The rows as ``<stem>.csv`` and ``<stem>.json``, their budget adherence as ``<stem>-adherence.json`` and
    their target ratios as ``<stem>-targets.json``; ``ValueError`` for no rows."""
    _check_rows(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [asdict(r) for r in rows]
    write_csv(records, out / f"{stem}.csv")
    for suffix, values in (("", records), ("-adherence", budget_adherence(rows)), ("-targets", target_ratios(rows))):
        with whole_file(out / f"{stem}{suffix}.json") as f:
            f.write(json.dumps(_json_safe(values), indent=1, allow_nan=False))


def _check_rows(rows: list[Row]) -> None:
    """``ValueError`` naming ``rows`` where there are none: an empty table or plot says nothing."""
    if not rows:
        raise ValueError("rows is empty: there is nothing to write or plot")


def _json_safe(records: list[dict]) -> list[dict]:
    """``records`` with NaN and infinities (not measured, or not a number) as None: null in strict JSON."""
    return [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in records]


def read_records(path) -> list[dict]:
    """The records of a JSON file ``write_records`` wrote, null (not measured) back to NaN."""
    return [{k: float("nan") if v is None else v for k, v in r.items()} for r in json.loads(Path(path).read_text())]


def plot_rows(rows: list[Row], path: Path) -> Path | None:
    """Prefill and decode latency versus budget per variant and backend, with the ideal lines, as a PNG
    at ``path``; None without matplotlib. ``ValueError`` for no rows."""
    _check_rows(rows)
    plt = pyplot("the sweep's plot (its rows are written)")
    if plt is None:
        return None

    panels = [("prefill_ms", "prefill, wall"), ("decode_ms_per_token", "decode / token (steady state), wall")]
    if any(not math.isnan(r.prefill_kernel_ms) for r in rows):  # not all NaN: kernel times were taken
        panels.insert(1, ("prefill_kernel_ms", "prefill, GPU kernel time"))
    if any(not math.isnan(r.prefill_graph_ms) for r in rows):
        panels.insert(1, ("prefill_graph_ms", "prefill, one CUDA graph replayed"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    adaptive = [r for r in rows if r.system == "adaptive"]
    for ax, (field, title) in zip(axes, panels):
        for key in sorted({(r.variant, r.backend) for r in adaptive}):
            series = sorted((r for r in adaptive if (r.variant, r.backend) == key), key=lambda r: r.budget)
            full = next((getattr(r, field) for r in series if r.budget == 1.0), None)
            line, = ax.plot([r.budget for r in series], [getattr(r, field) for r in series], "o-", label=f"{key[0]} {key[1]}")
            if full is not None:
                ax.plot([r.budget for r in series], [full * r.cost for r in series], "--", color=line.get_color(),
                        label=f"{key[0]} {key[1]} ideal (full x cost)")
        for system, style in (("stock", ":"), ("stock-static-compiled", "-.")):
            values = [getattr(r, field) for r in rows if r.system == system and not math.isnan(getattr(r, field))]
            if values:
                ax.axhline(values[0], color="gray", linestyle=style, label=f"{system} transformers")
        for system, style, what in (("ideal", "x:", "stock model cut to the plan"),
                                    ("masked", "+:", "masked computation (no skipping)")):
            measured = sorted((r for r in rows if r.system == system and not math.isnan(getattr(r, field))),
                              key=lambda r: r.budget)
            for variant in sorted({r.variant for r in measured}):
                points = [r for r in measured if r.variant == variant]
                ax.plot([r.budget for r in points], [getattr(r, field) for r in points], style,
                        color=REFERENCE_COLORS.get(variant, "black"), label=f"{variant}: {what}")
        ax.set_xlabel("latency budget")
        ax.set_ylabel("ms")
        ax.set_title(f"{title}\n{rows[0].model} on {rows[0].device}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
