"""The main job: plans, costs and measured generate latency of a patched LLaVA over budgets.

    adaptive-kernels                      # built-in tiny random LLaVA, no download
    adaptive-kernels --model PATH --device cuda --budgets 1.0 0.6

For each (variant, budget) it prints the plan, its FLOP cost and the median wall time of a plain greedy
``generate`` (a checkpoint's own generation settings are not used), then writes ``results.csv`` and
``latency_vs_budget.png`` (measured next to the ideal: latency at budget 1.0 times the plan's cost) to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .measuring import (cpu_threads, default_dtype, device_name, make_out_dir, median_timer, pyplot, run_stamp,
                        write_csv)
from .plan import PAPER_RANK
from .tiny import TINY_RANK

DEFAULT_BUDGETS = (1.0, 0.85, 0.6, 0.5)
DEFAULT_PROMPT = "What is shown in this image?"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")  # an image processor: a tokenizer is not enough
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # ... and neither is an image processor
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
MAX_SEED = 2 ** 32 - 1  # a range every seeder takes (numpy's legacy one stops there)
CSV_NAME, PNG_NAME = "results.csv", "latency_vs_budget.png"


class OptionError(Exception):
    """An option cannot be used with the model, found once it is loaded (its message names the option)."""


def _budget(text: str) -> float:
    from .plan import resolve_budgets

    try:
        (value,) = resolve_budgets(float(text), 1)  # the package's own check: (0, 1], no NaN
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got {text!r}") from None
    return value


def _folder(text: str) -> Path:
    """A folder path; an empty one (which Path reads as the current folder) is refused."""
    if not text:
        raise argparse.ArgumentTypeError("must name a folder, got an empty path")
    return Path(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}], got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``adaptive-kernels``."""
    from .backends import BACKENDS
    from .plan import VARIANTS

    p = argparse.ArgumentParser(
        prog="adaptive-kernels",
        description="Run AdaLLaVA execution plans on a LLaVA model over latency budgets: print each plan, "
                    "its FLOP cost and the measured generate latency; write a CSV and a latency-vs-budget plot.",
        epilog="adaptive-kernels sweep [options] runs the end-to-end latency sweep instead (adaptive-kernels sweep "
               "--help).")
    p.add_argument("--model", type=Path, metavar="PATH",
                   help="local Hugging Face LLaVA checkpoint folder (default: the built-in tiny random LLaVA); "
                        "decoding is plain greedy: the checkpoint's own generation settings are not used")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), metavar="V",
                   help=f"AdaLLaVA variants, from {{{', '.join(VARIANTS)}}} (default: all)")
    p.add_argument("--budgets", nargs="+", type=_budget, default=list(DEFAULT_BUDGETS), metavar="B",
                   help="latency budgets in (0, 1] (default: %(default)s)")
    p.add_argument("--rank", type=_positive_int,
                   help=f"heads and MLP groups per H unit; must divide the heads for variant H (default: the "
                        f"--scheduler file's, else {TINY_RANK} for the built-in 8-head model, {PAPER_RANK} with --model, "
                        "which is meant for 32-head models)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=16, metavar="N",
                   help="tokens each timed generate makes, an end of sequence held off (default: %(default)s)")
    p.add_argument("--repeats", type=_positive_int, default=5, metavar="N",
                   help="timed generate calls per point after one warm-up; the median is reported (default: %(default)s)")
    p.add_argument("--backend", choices=BACKENDS, help="ops backend (default: triton on cuda, torch on cpu)")
    p.add_argument("--scheduler", type=Path, metavar="PATH",
                   help="scheduler weights (safetensors from adaptive_kernels.save_scheduler) for the one variant given "
                        "with --variants; its rank and prefix layers are used (default: the seeded, untrained "
                        "scheduler)")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch CPU threads (default: 1 for the built-in tiny model on cpu, where more threads only "
                        "add contention; torch's default otherwise)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the built-in model's weights and of the random example inputs (default: %(default)s)")
    p.add_argument("--prompt", help=f"question; only with a --model that has a processor (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--image", type=Path, metavar="PATH",
                   help="image; only with a --model that has a processor (default: seeded random pixels)")
    p.add_argument("--out", type=_folder, default=Path("adaptive_kernels_out"), metavar="DIR",
                   help="output folder for the CSV and the plot (default: ./%(default)s)")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.variants, args.budgets = list(dict.fromkeys(args.variants)), list(dict.fromkeys(args.budgets))
    _resolve_device(parser, args)
    if args.dtype is None:
        args.dtype = str(default_dtype(args.device)).removeprefix("torch.")
    if args.model is not None:
        _check_model(parser, args.model)
    if args.scheduler is not None and len(args.variants) > 1:
        parser.error("argument --scheduler: a scheduler file holds one variant's weights; pass a single --variants")
    for name in ("scheduler", "image"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            parser.error(f"argument --{name}: no such file: {path}")
    if args.image is not None:
        _check_image(parser, args.image)
    _check_processor_options(parser, args)
    _check_backends(parser, "--backend", [args.backend] if args.backend else [], args.device, DTYPES[args.dtype])
    _check_out(parser, args.out, (CSV_NAME, PNG_NAME))  # last: it makes the folder


def _check_processor_options(parser, args: argparse.Namespace) -> None:
    """``parser.error`` for --prompt or --image where no processor could use them: the built-in model and a
    checkpoint without a processor take random inputs."""
    given = [f"--{name}" for name in ("prompt", "image") if getattr(args, name) is not None]
    if given and not (args.model is not None and _has_processor(args.model)):
        holder = "the built-in model" if args.model is None else f"{args.model}, which has no processor,"
        parser.error(f"argument {given[0]}: only a --model with a processor (an image processor and a tokenizer) "
                     f"reads a question and an image; {holder} takes random inputs")


def _resolve_device(parser, args: argparse.Namespace) -> None:
    """``args.device``: cuda when torch sees a CUDA device, else cpu, unless given; ``parser.error`` for cuda
    without one."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda requested but torch sees no CUDA device")


def _check_backends(parser, option: str, backends: list, device: str, dtype: torch.dtype) -> None:
    """``parser.error`` for a backend that cannot run a ``dtype`` model on ``device`` (before anything is loaded)."""
    from .backends import check_backends

    if "cuda" in backends and device != "cuda":  # check_backends would advise model.to('cuda'), not an option
        parser.error(f"argument {option}: backend cuda runs CUDA kernels, but --device is {device}; give --device "
                     "cuda on a machine with a GPU, or another backend")
    try:
        check_backends(f"argument {option}", backends, torch.device(device), dtype)
    except ValueError as refused:
        parser.error(str(refused))


def _check_model(parser, path: Path) -> None:
    """``parser.error`` unless ``path`` is a LLaVA checkpoint folder of a supported language model, with weights
    (before loading anything)."""
    import json

    from .models import SUPPORTED_TEXT_MODELS

    if not (path / "config.json").is_file():
        parser.error(f"argument --model: {path} is not a Hugging Face checkpoint folder (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
        model_type = config.get("model_type")
        text_type = (config.get("text_config") or {}).get("model_type", "llama")  # LlavaConfig's default
    except (OSError, ValueError, AttributeError) as error:
        parser.error(f"argument --model: {path / 'config.json'} is not a readable config ({error})")
    if model_type != "llava":
        parser.error(f"argument --model: {path} holds a {model_type!r} model; adaptive-kernels runs LLaVA checkpoints "
                     "(model_type 'llava')")
    if text_type not in SUPPORTED_TEXT_MODELS:
        parser.error(f"argument --model: {path}'s language model is {text_type!r}; adaptive-kernels runs LLaVA "
                     f"checkpoints whose language model is one of {sorted(SUPPORTED_TEXT_MODELS)}")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        parser.error(f"argument --model: {path} has no weights (none of {', '.join(WEIGHT_FILES)})")


def _check_image(parser, path: Path) -> None:
    """``parser.error`` unless Pillow can read the image at ``path``, its pixel data included."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            image.verify()  # the file's structure
        with Image.open(path) as image:
            image.load()  # its pixel data, which verify() does not decode in a JPEG (a truncated one passes)
    except ImportError:
        parser.error("argument --image: reading an image needs Pillow (pip install pillow)")
    except (OSError, SyntaxError, ValueError) as error:
        parser.error(f"argument --image: {path} is not an image Pillow can read ({error})")


def _check_out(parser, out: Path, files) -> None:
    """Make the folder ``out``, or ``parser.error`` when it cannot be one, a file cannot be created in it, or
    one of ``files`` (the names the job writes there) is a folder (before anything is timed)."""
    try:
        make_out_dir("argument --out", out, files)
    except ValueError as refused:
        parser.error(str(refused))


def _has_processor(path: Path) -> bool:
    """Whether the checkpoint folder has a processor that can turn an image and a question into inputs: an
    image processor and a tokenizer."""
    return (any((path / name).is_file() for name in PROCESSOR_FILES)
            and any((path / name).is_file() for name in TOKENIZER_FILES))


def _processor_inputs(path: Path, model, prompt: str, image_path: Path | None, seed: int) -> dict:
    """Inputs from the checkpoint's own processor: one image and one question; ``OptionError`` naming --model
    where the processor cannot be loaded or cannot make them."""
    import numpy as np
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise OptionError(f"argument --model: cannot load the processor of {path} ({error})") from error
    image_token = getattr(processor, "image_token", "<image>")
    if image_token in prompt:
        raise OptionError(f"argument --prompt: holds the image token {image_token!r}; give the question only (the "
                          "image's place in the prompt is the job's to set)")
    if image_path is not None:
        from PIL import Image

        image = Image.open(image_path).convert("RGB")
    else:
        size = model.config.vision_config.image_size
        image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        try:
            text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        except Exception as error:  # the template is the checkpoint's own code, and may raise anything
            raise OptionError(f"argument --model: the chat template of {path} cannot make a prompt of an image and a "
                              f"question ({type(error).__name__}: {error})") from error
    else:
        text = f"USER: {image_token}\n{prompt} ASSISTANT:"
    try:
        batch = processor(images=image, text=text, return_tensors="pt")
    except (TypeError, ValueError) as error:  # e.g. a LlavaProcessor without patch_size (no processor_config.json)
        raise OptionError(f"argument --model: the processor of {path} cannot make inputs from an image and a "
                          f"question ({type(error).__name__}: {error})") from error
    inputs = {k: v.to(model.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    _check_processor_inputs(path, model, inputs)
    return inputs


def _check_processor_inputs(path: Path, model, inputs: dict) -> None:
    """``OptionError`` naming --model where the processor's inputs do not fit the model: token ids past its
    vocabulary, images of another size than its vision tower's, or another number of image tokens than the
    tower makes features (where ``image_token_count`` can count them)."""
    from .tiny import image_token_count

    vocabulary = model.get_input_embeddings().num_embeddings
    text_ids = inputs["input_ids"][inputs["input_ids"] != model.config.image_token_id]
    outside = text_ids[(text_ids < 0) | (text_ids >= vocabulary)]
    if outside.numel():
        raise OptionError(f"argument --model: the tokenizer of {path} makes token id {int(outside[0])}, outside the "
                          f"{vocabulary} ids of the model's vocabulary")
    size = model.config.vision_config.image_size
    wanted = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    pixels = inputs.get("pixel_values")
    if pixels is None or tuple(pixels.shape[-2:]) != wanted:
        made = "no images" if pixels is None else f"{tuple(pixels.shape[-2:])} images"
        raise OptionError(f"argument --model: the processor of {path} makes {made}, its vision tower takes {wanted}")
    try:
        features = image_token_count(model)
    except ValueError:  # a tower it cannot count: the model's first call checks
        return
    tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if tokens != features:
        raise OptionError(f"argument --model: the processor of {path} puts {tokens} image tokens in the prompt, its "
                          f"vision tower makes {features} features per image")


def load(args) -> tuple:
    """``(model, inputs, name, default_rank)`` for the parsed arguments."""
    from .tiny import example_inputs, tiny_llava

    dtype = DTYPES[args.dtype]
    if args.model is None:
        model, name, rank = tiny_llava(seed=args.seed), f"tiny_llava(seed={args.seed})", TINY_RANK
    else:
        from huggingface_hub.errors import StrictDataclassError  # a config field of the wrong type
        from safetensors import SafetensorError
        from transformers import LlavaForConditionalGeneration

        try:
            model, loading = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype,
                                                                           output_loading_info=True)
        except (OSError, ValueError, TypeError, RuntimeError, SafetensorError, StrictDataclassError) as error:
            raise OptionError(f"argument --model: cannot load {args.model} ({error})") from error
        if missing := sorted(loading["missing_keys"]):  # transformers would fill them with random values
            raise OptionError(f"argument --model: {args.model} lacks {len(missing)} of the model's tensors, "
                              f"first {missing[0]}; a checkpoint with every tensor is needed")
        model.eval()
        model.generation_config = _plain_generation_config(model.generation_config)
        name, rank = str(args.model), PAPER_RANK
    vocab, image_token = model.config.text_config.vocab_size, model.config.image_token_id
    if not 0 <= image_token < vocab:
        raise OptionError(f"argument --model: the image token id of {name}, {image_token}, is outside its vocabulary "
                          f"[0, {vocab}): its prompts cannot be embedded")
    model = model.to(device=args.device, dtype=dtype)
    if args.model is not None and _has_processor(args.model):
        prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
        inputs = _processor_inputs(args.model, model, prompt, args.image, args.seed)
    else:
        inputs = example_inputs(model, batch_size=1, seed=args.seed)
    return model, inputs, name, rank


def _plain_generation_config(config):
    """transformers' default ``GenerationConfig`` with ``config``'s special token ids only: the job times plain
    greedy decoding, whatever beams, penalties or lengths a checkpoint's generation_config.json sets."""
    from transformers import GenerationConfig

    special = ("bos_token_id", "eos_token_id", "pad_token_id")
    return GenerationConfig(**{name: getattr(config, name) for name in special})


def time_generate(model, inputs: dict, budget: float, max_new_tokens: int, repeats: int, device: str):
    """``(median milliseconds, new token ids)`` of greedy generate of exactly ``max_new_tokens`` tokens (an end of
    sequence held off, so that every budget times as many): one warm-up, then ``repeats`` timed runs, timed as the
    sweep times (``measuring.median_timer``)."""
    outputs = []

    def generate():
        with torch.no_grad():
            outputs.append(model.generate(**inputs, latency_budget=budget, max_new_tokens=max_new_tokens,
                                          min_new_tokens=max_new_tokens, do_sample=False))

    ms = median_timer(device)(generate, repeats)
    return ms, outputs[-1][0, inputs["input_ids"].shape[1]:].tolist()


def run(model, inputs: dict, args, rank: int, name: str, num_prefix_layers: int | None) -> list[dict]:
    """Patch (``num_prefix_layers`` None: half the layers), plan and time every (variant, budget); print each and
    return the CSV rows."""
    import adaptive_kernels as ak

    common = {"model": name, "device": args.device, "device_name": device_name(args.device), "dtype": args.dtype,
              **run_stamp()}
    rows = []
    for variant in args.variants:
        try:
            ak.patch(model, variant=variant, rank=rank, num_prefix_layers=num_prefix_layers, backend=args.backend,
                     scheduler=None if args.scheduler is None else str(args.scheduler))
        except (TypeError, ValueError) as error:
            scheduler = "" if args.scheduler is None else f" with --scheduler {args.scheduler} (its saved setting)"
            raise OptionError(f"cannot patch the model for variant {variant}{scheduler}: {error}") from error
        units = model.model.language_model._ak_settings.units
        backend = model.model.language_model._ak_settings.backend.name
        full_ms = None
        for budget in args.budgets:
            plan = ak.plan(model, latency_budget=budget, **inputs)
            cost = float(plan.cost()[0])
            ms, tokens = time_generate(model, inputs, budget, args.max_new_tokens, args.repeats, args.device)
            if budget == 1.0:
                full_ms = ms
            layers = plan.layers[0].nonzero().flatten().tolist()
            print(f"variant {variant}  budget {budget!r}  units {units.scheduled_units(budget)}  cost {cost:.4f}  "
                  f"latency {ms:.2f} ms")
            print(f"  {plan.summary()}")
            print(f"  tokens {tokens}")
            rows.append({"variant": variant, "budget": budget, "units": units.scheduled_units(budget),
                         "executed_layers": " ".join(map(str, layers)), "cost": cost, "latency_ms": ms,
                         "ideal_ms": None, "tokens": " ".join(map(str, tokens)), "rank": rank,
                         "backend": backend, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                         **common})
        for row in rows:
            if row["variant"] == variant and full_ms is not None:
                row["ideal_ms"] = full_ms * row["cost"]
    ak.unpatch(model)
    return rows


def write_plot(rows: list[dict], path: Path, title: str) -> bool:
    """Latency versus budget per variant, with the ideal line; False (and a note) without matplotlib."""
    plt = pyplot("the plot")
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["budget"])
        budgets = [r["budget"] for r in mine]
        (line,) = ax.plot(budgets, [r["latency_ms"] for r in mine], "o-", label=f"{variant} measured")
        if all(r["ideal_ms"] is not None for r in mine):
            ax.plot(budgets, [r["ideal_ms"] for r in mine], "--", color=line.get_color(),
                    label=f"{variant} ideal (latency at 1.0 x cost)")
    ax.set_xlabel("latency budget")
    ax.set_ylabel("generate latency (ms, median)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def sweep_main(argv) -> int:
    """``adaptive-kernels sweep``: the end-to-end latency-versus-budget sweep (``adaptive_kernels.sweep``)."""
    from .backends import BACKENDS
    from .plan import VARIANTS
    from .sweep import BUDGETS, SweepIncomplete, output_files, report, sweep

    p = argparse.ArgumentParser(prog="adaptive-kernels sweep",
                                description="Vision, prefill and per-token decode latency over budgets, next to stock "
                                            "transformers, the ideal and the masked computation; a 7B-shaped model "
                                            "on CUDA, the tiny one on the CPU. Writes CSV, JSON and a PNG.")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="default: %(default)s")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, help="default: triton and torch on cuda, torch on cpu")
    p.add_argument("--budgets", nargs="+", type=_budget, default=list(BUDGETS), metavar="B",
                   help="latency budgets in (0, 1]; 1.0 gives the ideal lines and adherence (default: %(default)s)")
    p.add_argument("--new-tokens", type=_positive_int, default=16, metavar="N",
                   help="decoded tokens per timing (default: %(default)s)")
    p.add_argument("--repeats", type=_positive_int, default=3, metavar="N", help="default: %(default)s")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch CPU threads (default: 1 on cpu, where the tiny model's timings are otherwise "
                        "contention noise; torch's default on cuda)")
    p.add_argument("--out", type=_folder, default=Path("benchmarks/results"), metavar="DIR",
                   help="output folder (default: ./%(default)s)")
    args = p.parse_args(argv)
    args.variants, args.budgets = list(dict.fromkeys(args.variants)), list(dict.fromkeys(args.budgets))
    args.backends = None if args.backends is None else list(dict.fromkeys(args.backends))
    _resolve_device(p, args)
    _check_backends(p, "--backends", args.backends or [], args.device, default_dtype(args.device))
    _check_out(p, args.out, output_files(args.device))
    if 1.0 not in args.budgets:
        print("note: budget 1.0 is not among --budgets: no ideal lines, and no adherence (both scale latency at 1.0)")
    failures = []
    try:
        rows = sweep(args.device, args.variants, args.backends, args.budgets, args.new_tokens, args.repeats,
                     out_dir=args.out, threads=args.threads)
    except SweepIncomplete as incomplete:
        rows, failures = incomplete.rows, incomplete.failures
    print(report(rows))
    print(f"rows, adherence, target ratios and plot (if drawn) are in {args.out}")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


def main(argv=None) -> int:
    """Entry point of ``adaptive-kernels`` and ``python -m adaptive_kernels``; returns the exit code.

    ``adaptive-kernels sweep ...`` runs the end-to-end sweep instead of the main job.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:
        return sweep_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    tiny_on_cpu = args.model is None and args.device == "cpu"
    with cpu_threads(args.threads if args.threads is not None else 1 if tiny_on_cpu else None):  # restored after
        try:
            return _main(parser, args)
        except OptionError as error:
            parser.error(str(error))


def _saved_int(setting: dict[str, str], key: str) -> int | None:
    """``setting[key]`` as an int; None where it is missing or not a decimal integer (``ak.patch`` then refuses
    the file by name)."""
    value = setting.get(key, "")
    return int(value) if value.isdecimal() else None


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .models.llava import SCHEDULER_FILE
    from .scheduler import saved_setting

    model, inputs, name, default_rank = load(args)
    saved_scheduler = None if args.model is None else args.model / SCHEDULER_FILE
    if args.scheduler is None and saved_scheduler is not None and saved_scheduler.is_file():
        print(f"note: {saved_scheduler} is not used: the seeded, untrained scheduler runs unless --scheduler names it")
    try:  # a scheduler file's rank (where --rank is not given) and prefix: the setting its weights were trained in
        saved = {} if args.scheduler is None else saved_setting(args.scheduler)
    except ValueError as error:
        parser.error(f"argument --scheduler: {error}")
    saved_rank = _saved_int(saved, "rank")
    rank = args.rank or saved_rank or default_rank
    num_prefix_layers = _saved_int(saved, "num_prefix_layers")
    heads = model.config.text_config.num_attention_heads
    if "H" in args.variants and heads % rank:
        given = "--rank:" if args.rank or not saved_rank else "--scheduler: its saved rank,"
        parser.error(f"argument {given} {rank} does not divide the model's {heads} attention heads (variant H)")
    print(f"model {name} | device {args.device} ({device_name(args.device)}) | dtype {args.dtype} | rank {rank} | "
          f"cpu threads {torch.get_num_threads()} | prompt {inputs['input_ids'].shape[1]} tokens | "
          f"{args.max_new_tokens} new tokens | median of {args.repeats}")
    rows = run(model, inputs, args, rank, name, num_prefix_layers)
    write_csv(rows, args.out / CSV_NAME)
    print(f"wrote {args.out / CSV_NAME}")
    if 1.0 not in args.budgets:
        print("note: budget 1.0 is not among --budgets, so the plot has no ideal line")
    title = f"{name} | {rows[0]['device_name']} | {args.dtype} | {rows[0]['backend']} | {args.max_new_tokens} new tokens"
    if write_plot(rows, args.out / PNG_NAME, title):
        print(f"wrote {args.out / PNG_NAME}")
    return 0
