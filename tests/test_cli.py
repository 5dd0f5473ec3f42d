"""The ``adaptive-kernels`` main job, against a stock tiny LLaVA fed the prompt plus the latency token."""

from __future__ import annotations

import contextlib
import copy
import csv
import importlib.metadata
import io
import json
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import adaptive_kernels as ak
from adaptive_kernels.cli import CSV_NAME, PNG_NAME, _check_args, build_parser, main
from adaptive_kernels.errors import ArgumentTypeError
from adaptive_kernels.models.llava import prompt_embeddings
from adaptive_kernels.sliced import sliced_stock
from adaptive_kernels.tiny import TINY_RANK, example_inputs, image_token_count, tiny_llava
from oracles import fed_latency_token

BUDGETS = (1.0, 0.85, 0.6, 0.5)
NEW_TOKENS = 6
FAST = ["--device", "cpu", "--repeats", "1", "--max-new-tokens", str(NEW_TOKENS)]  # CPU: the references run there


def run_main(argv: list[str]) -> tuple[list[dict], str]:
    """Run ``main(argv)``; return the CSV rows it wrote to ``--out`` and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    out = Path(argv[argv.index("--out") + 1])
    with open(out / CSV_NAME, newline="") as f:
        return list(csv.DictReader(f)), printed.getvalue()


def exits_naming(capsys, argv: list[str], says: str) -> None:
    """``main(argv)`` (run fast on the CPU) exits 2, its error holding ``says`` and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *FAST])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err


def ids(text: str) -> list[int]:
    return [int(t) for t in text.split()]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    rows, printed = run_main(["--out", str(out), *FAST])
    return out, rows, printed


def stock_greedy_with_latency_token(inputs: dict, variant: str, budget: float, n: int) -> list[int]:
    """Greedy tokens of a stock tiny LLaVA cut to the plan of ``budget`` (``sliced_stock``; at 1.0 the stock model
    itself), fed the prompt's embeddings followed by the latency token."""
    stock = tiny_llava()
    model = ak.patch(copy.deepcopy(stock), variant, rank=TINY_RANK)
    oracle = sliced_stock(stock, ak.plan(model, latency_budget=budget, **inputs), 0)
    embeds, mask = fed_latency_token(model, stock, inputs, [budget])
    with torch.no_grad():
        out = oracle.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False)
    return out[0].tolist()


def test_one_row_per_variant_and_budget(default_run):
    _, rows, printed = default_run
    assert sorted((r["variant"], float(r["budget"])) for r in rows) == sorted((v, b) for v in "LH" for b in BUDGETS)
    assert printed.count("variant ") == len(rows) == 8
    assert "cpu threads 1 |" in printed  # the built-in model on the cpu: one thread unless told
    for r in rows:
        assert float(r["latency_ms"]) > 0 and r["torch"] == torch.__version__ and r["device"] == "cpu"
        assert (r["backend"], r["rank"], r["max_new_tokens"], r["repeats"]) == ("torch", str(TINY_RANK), str(NEW_TOKENS), "1")


def test_costs_lie_in_range_and_fall_with_the_budget(default_run):
    _, rows, _ = default_run
    for variant in "LH":
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: -float(r["budget"]))
        costs = [float(r["cost"]) for r in mine]
        assert all(0 < c <= 1 for c in costs), costs
        assert costs == sorted(costs, reverse=True), costs
        assert costs[0] == pytest.approx(1.0) and costs[-1] == pytest.approx(0.5)  # full, then the prefix only
    for r in rows:
        layers = ids(r["executed_layers"])
        assert layers[:4] == [0, 1, 2, 3]  # the prefix always runs
        if r["variant"] == "L":  # whole layers of equal FLOPs: the cost is the share of layers run
            assert float(r["cost"]) == pytest.approx(len(layers) / 8)
            assert int(r["units"]) == len(layers) - 4


def test_ideal_is_the_latency_at_full_budget_times_the_cost(default_run, tmp_path):
    """Each row's ideal_ms is its variant's measured latency at budget 1.0 times the row's plan cost; without
    1.0 among the budgets there is no latency to scale, and ideal_ms is left empty."""
    _, rows, _ = default_run
    for variant in "LH":
        mine = [r for r in rows if r["variant"] == variant]
        (full,) = [r for r in mine if float(r["budget"]) == 1.0]
        assert len(mine) == len(BUDGETS)
        for r in mine:
            assert float(r["ideal_ms"]) == pytest.approx(float(full["latency_ms"]) * float(r["cost"]), rel=1e-12)
        assert any(float(r["cost"]) < 1 for r in mine)  # the ideal falls below the latency at 1.0 somewhere
    partial, printed = run_main(["--variants", "L", "--budgets", "0.9999999", "0.5", "--out", str(tmp_path), *FAST])
    assert [float(r["budget"]) for r in partial] == [0.9999999, 0.5]
    assert "budget 0.9999999 " in printed  # as given, not rounded to 1.00 or 1
    assert "note: budget 1.0 is not among --budgets" in printed and "note:" not in default_run[2]
    assert all(r["ideal_ms"] == "" for r in partial)


def test_tokens_equal_stock_greedy_cut_to_each_plan(default_run):
    """Every row's tokens (CSV and printed) are what stock generates cut to that budget's plan: stock itself at 1.0."""
    _, rows, printed = default_run
    inputs = example_inputs(tiny_llava())
    for row in rows:
        expected = stock_greedy_with_latency_token(inputs, row["variant"], float(row["budget"]), NEW_TOKENS)
        assert len(expected) == NEW_TOKENS
        assert ids(row["tokens"]) == expected, (row["variant"], row["budget"])
        assert f"tokens {expected}" in printed
    # and the budget matters: the prefix-only plan generates something else
    assert any(ids(r["tokens"]) != ids(rows[0]["tokens"]) for r in rows if r["variant"] == rows[0]["variant"])


def test_each_timed_generate_makes_its_tokens_an_end_of_sequence_held_off():
    """Budgets are timed at equal work: an end of sequence (here the token greedy makes first) stops no timed
    generate early, which would have set the latency of a short answer beside that of a long one."""
    from adaptive_kernels.cli import time_generate

    model = ak.patch(tiny_llava(), "L", rank=TINY_RANK)
    inputs = example_inputs(model)
    _, free = time_generate(model, inputs, 1.0, 5, 1, "cpu")
    model.generation_config.eos_token_id = free[0]
    _, held = time_generate(model, inputs, 1.0, 5, 1, "cpu")
    assert len(held) == 5 and free[0] not in held


def test_plot_is_a_png(default_run):
    pytest.importorskip("matplotlib")  # the optional extra "plot"
    out, _, printed = default_run
    data = (out / PNG_NAME).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    assert data.endswith(b"IEND\xaeB`\x82")
    assert f"wrote {out / PNG_NAME}" in printed


def word_tokenizer(words_past_the_model: int = 0):
    """A word-level tokenizer over the tiny model's 512 ids, ``<image>`` the image token, and
    ``words_past_the_model`` more words ``x0``, ``x1``... with ids from 512 on, which the model lacks."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(511)} | {"<image>": 511}
    vocab |= {f"x{i}": 512 + i for i in range(words_past_the_model)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w1", pad_token="w0",
                                   additional_special_tokens=["<image>"])


def test_model_path_without_processor_matches_builtin(default_run, tmp_path):
    """A checkpoint without an image processor (here: a tokenizer only) runs on the built-in random inputs."""
    _, builtin, _ = default_run
    tiny_llava().save_pretrained(tmp_path / "ckpt")
    word_tokenizer().save_pretrained(tmp_path / "ckpt")
    rows, printed = run_main(["--model", str(tmp_path / "ckpt"), "--rank", "2", "--budgets", "1.0", "0.6",
                              "--out", str(tmp_path / "out"), *FAST])
    assert str(tmp_path / "ckpt") in printed
    assert f"cpu threads {torch.get_num_threads()} |" in printed  # torch's default: only the built-in model gets 1
    assert len(rows) == 4
    for r in rows:
        (same,) = [b for b in builtin if b["variant"] == r["variant"] and b["budget"] == r["budget"]]
        for key in ("tokens", "executed_layers", "units", "cost"):
            assert r[key] == same[key], key


def test_model_path_with_processor(tmp_path, capsys):
    image_module = pytest.importorskip("PIL.Image")
    from transformers import CLIPImageProcessor, LlavaProcessor

    processor = LlavaProcessor(CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
                               word_tokenizer(), patch_size=7, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token="<image>")
    tiny_llava().save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    gen = torch.Generator().manual_seed(3)
    image = image_module.fromarray(torch.randint(0, 256, (40, 32, 3), generator=gen, dtype=torch.uint8).numpy())
    image.save(tmp_path / "image.png")
    prompt = "w5 w6 w7 ?"
    rows, _ = run_main(["--model", str(tmp_path / "ckpt"), "--rank", "2", "--variants", "H", "--budgets", "1.0",
                        "--image", str(tmp_path / "image.png"), "--prompt", prompt, "--out", str(tmp_path / "out"), *FAST])
    inputs = dict(processor(images=image, text=f"USER: <image>\n{prompt} ASSISTANT:", return_tensors="pt"))
    assert int((inputs["input_ids"] == 511).sum()) == 16
    assert ids(rows[0]["tokens"]) == stock_greedy_with_latency_token(inputs, "H", 1.0, NEW_TOKENS)
    with pytest.raises(SystemExit) as exit_info:  # the job places the image token itself
        main(["--model", str(tmp_path / "ckpt"), "--rank", "2", "--prompt", "<image> w5 ?", "--out",
              str(tmp_path / "out2"), *FAST])
    assert exit_info.value.code == 2 and not (tmp_path / "out2" / CSV_NAME).exists()
    assert "argument --prompt: holds the image token '<image>'" in capsys.readouterr().err


def test_prompt_and_image_without_a_processor_are_refused(tmp_path, capsys):
    """The built-in model and a checkpoint without a processor take random inputs: a --prompt or --image given
    to them was ignored without a word. The job exits naming the option before anything is timed."""
    image_module = pytest.importorskip("PIL.Image")
    pixels = torch.randint(0, 256, (28, 28, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    image_module.fromarray(pixels.numpy()).save(tmp_path / "image.png")
    tiny_llava().save_pretrained(tmp_path / "ckpt")  # weights only
    for model, option, value in (([], "--prompt", "w5 ?"), ([], "--image", str(tmp_path / "image.png")),
                                 (["--model", str(tmp_path / "ckpt")], "--prompt", "w5 ?")):
        with pytest.raises(SystemExit) as exit_info:
            main([*model, option, value, "--out", str(tmp_path / "out"), *FAST])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err, err
        assert f"argument {option}: only a --model with a processor" in err, err
        assert not (tmp_path / "out" / CSV_NAME).exists()


@pytest.mark.parametrize("mismatch", ["image size", "more image tokens", "fewer image tokens"])
def test_processor_whose_inputs_do_not_fit_the_model_is_refused_naming_model(tmp_path, capsys, mismatch):
    """A processor making 32x32 images for a 28x28 tower, or 81 image tokens (9x9 patches of 3) or 4 (2x2 patches of
    14) where the tower makes 16 features: the job failed in the model's first call with a traceback. It exits
    naming --model."""
    pytest.importorskip("PIL.Image")
    from transformers import CLIPImageProcessor, LlavaProcessor

    side, patch = {"image size": (32, 8), "more image tokens": (28, 3), "fewer image tokens": (28, 14)}[mismatch]
    images = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaProcessor(images, word_tokenizer(), patch_size=patch, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token="<image>")
    tiny_llava().save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "ckpt"), "--rank", "2", "--variants", "L", "--budgets", "1.0", "--out",
              str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    wanted = {"image size": "makes (32, 32) images, its vision tower takes (28, 28)",
              "more image tokens": "puts 81 image tokens in the prompt, its vision tower makes 16 features",
              "fewer image tokens": "puts 4 image tokens in the prompt, its vision tower makes 16 features"}[mismatch]
    assert f"argument --model: the processor of {tmp_path / 'ckpt'} {wanted}" in err, err


def test_malformed_checkpoints_and_scheduler_settings_exit_naming_the_option(tmp_path, capsys):
    """A config field of the wrong type (transformers raises an error that is no ValueError), an image token id
    outside the vocabulary (past it or negative), a scheduler file whose saved rank does not divide the heads or is
    no decimal integer, a --rank that does not divide them beside a scheduler saved at one that does (the --rank
    given is the one named, not the file), and an empty --out: each exits 2 naming the option, without a
    traceback."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    for name, edit in (("eps_as_text", {"rms_norm_eps": "1e-6"}), ("image_token_past_vocab", None),
                       ("image_token_negative", -3)):
        tiny_llava().save_pretrained(tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        if edit is None:
            config["image_token_id"] = config["text_config"]["vocab_size"]
        elif isinstance(edit, int):
            config["image_token_id"] = edit
        else:
            config["text_config"].update(edit)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    good = tmp_path / "good.safetensors"
    ak.save_scheduler(ak.patch(tiny_llava(), "H", rank=TINY_RANK), good)
    with safe_open(str(good), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for rank in ("3", "\u00b2"):  # a superscript two, which str.isdigit() takes and int() does not
        save_file(tensors, str(tmp_path / f"rank_{ord(rank)}.safetensors"), metadata=metadata | {"rank": rank})
    out = str(tmp_path / "out")
    for argv, says in ((["--model", str(tmp_path / "eps_as_text"), "--out", out], "argument --model: cannot load"),
                       (["--model", str(tmp_path / "image_token_past_vocab"), "--out", out],
                        "argument --model: the image token id of"),
                       (["--model", str(tmp_path / "image_token_negative"), "--out", out],
                        f"argument --model: the image token id of {tmp_path / 'image_token_negative'}, -3, is outside "
                        "its vocabulary [0, 512)"),
                       (["--scheduler", str(tmp_path / "rank_51.safetensors"), "--variants", "H", "--out", out],
                        "argument --scheduler: its saved rank, 3 does not divide the model's 8 attention heads"),
                       (["--scheduler", str(tmp_path / "rank_178.safetensors"), "--variants", "H", "--out", out],
                        "with --scheduler"),
                       (["--scheduler", str(good), "--variants", "H", "--rank", "3", "--out", out],
                        "argument --rank: 3 does not divide the model's 8 attention heads (variant H)"),
                       (["--out", ""], "argument --out: must name a folder, got an empty path")):
        exits_naming(capsys, argv, says)
    assert not (tmp_path / "out" / CSV_NAME).exists()


def test_checkpoint_generation_settings_are_not_used(default_run, tmp_path):
    """The job decodes plain greedy whatever the checkpoint's generation_config.json says: beam search and a
    repetition penalty there leave the ids those of the built-in model with the same weights."""
    import json

    _, builtin, _ = default_run
    tiny_llava().save_pretrained(tmp_path / "ckpt")
    settings = tmp_path / "ckpt" / "generation_config.json"
    settings.write_text(json.dumps(json.loads(settings.read_text()) | {"num_beams": 3, "repetition_penalty": 5.0}))
    rows, _ = run_main(["--model", str(tmp_path / "ckpt"), "--rank", "2", "--variants", "L", "--budgets", "1.0", "0.6",
                        "--out", str(tmp_path / "out"), *FAST])
    assert len(rows) == 2
    for r in rows:
        (same,) = [b for b in builtin if b["variant"] == "L" and b["budget"] == r["budget"]]
        assert r["tokens"] == same["tokens"]


def test_processor_that_cannot_make_inputs_is_refused_naming_model(tmp_path, capsys):
    """A tokenizer and an image processor without processor_config.json: transformers makes a LlavaProcessor that
    does not know its patch size, which cannot expand the image token. The job exits naming --model."""
    from transformers import CLIPImageProcessor

    tiny_llava().save_pretrained(tmp_path / "ckpt")
    word_tokenizer().save_pretrained(tmp_path / "ckpt")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    image_processor.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "ckpt"), "--variants", "L", "--budgets", "1.0", "--out", str(tmp_path / "out"),
              *FAST])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert f"argument --model: the processor of {tmp_path / 'ckpt'} cannot make inputs" in err, err
    assert not (tmp_path / "out" / CSV_NAME).exists()


@pytest.mark.parametrize("fault", ["chat template", "vocabulary"])
def test_processor_that_fails_on_the_prompt_is_refused_naming_model(tmp_path, capsys, fault):
    """A chat template that raises (one that needs a system message) and a tokenizer giving a word the first id past
    the model's vocabulary failed with a traceback (a TemplateError; an IndexError in the embedding). The job exits
    naming --model."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    template = "{{ raise_exception('a system message is required') }}" if fault == "chat template" else None
    processor = LlavaProcessor(CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
                               word_tokenizer(words_past_the_model=2), patch_size=7,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>", chat_template=template)
    tiny_llava().save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "ckpt"), "--rank", "2", "--variants", "L", "--budgets", "1.0", "--prompt",
              "w5 x0 ?", "--out", str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    wanted = ("the chat template of {} cannot make a prompt of an image and a question (TemplateError: a system "
              "message is required)" if fault == "chat template" else
              "the tokenizer of {} makes token id 512, outside the 512 ids of the model's vocabulary")
    assert "argument --model: " + wanted.format(tmp_path / "ckpt") in err, err


def test_a_scheduler_saved_beside_the_model_is_noted_when_not_used(tmp_path):
    """A patched model's save_pretrained writes its scheduler beside the checkpoint; the job runs the seeded one
    unless --scheduler names that file, and says so."""
    model = ak.patch(tiny_llava(), "L", rank=2)
    model.save_pretrained(tmp_path / "ckpt")
    saved = tmp_path / "ckpt" / "latency_scheduler.safetensors"
    _, printed = run_main(["--model", str(tmp_path / "ckpt"), "--variants", "L", "--budgets", "1.0", "--out",
                           str(tmp_path / "out"), *FAST])
    assert f"note: {saved} is not used" in printed
    _, printed = run_main(["--model", str(tmp_path / "ckpt"), "--variants", "L", "--rank", "2", "--budgets", "1.0",
                           "--scheduler", str(saved), "--out", str(tmp_path / "out2"), *FAST])
    assert "is not used" not in printed


def test_scheduler_file_is_used(default_run, tmp_path):
    _, builtin, _ = default_run
    model = ak.patch(tiny_llava(), "L", rank=2)
    head = model.model.language_model.latency_scheduler.head
    with torch.no_grad():  # reverse the layer preference of the seeded scheduler
        head.weight.neg_()
        head.bias.neg_()
    ak.save_scheduler(model, tmp_path / "scheduler.safetensors")
    rows, _ = run_main(["--variants", "L", "--budgets", "0.85", "--scheduler", str(tmp_path / "scheduler.safetensors"),
                        "--out", str(tmp_path / "out"), *FAST])
    inputs = example_inputs(model)
    expected = ak.plan(model, latency_budget=0.85, **inputs).layers[0].nonzero().flatten().tolist()
    (default,) = [r for r in builtin if r["variant"] == "L" and float(r["budget"]) == 0.85]
    assert ids(rows[0]["executed_layers"]) == expected
    assert rows[0]["executed_layers"] != default["executed_layers"]


def test_a_scheduler_file_runs_in_the_setting_it_was_saved_in(tmp_path):
    """A variant H file saved at rank 4 with 3 prefix layers runs without --rank (the built-in model's default is
    2) and without a prefix option (the default is half the 8 layers): its plans are the patched model's."""
    model = ak.patch(tiny_llava(), "H", rank=4, num_prefix_layers=3)
    head = model.model.language_model.latency_scheduler.head
    with torch.no_grad():
        head.weight.normal_(generator=torch.Generator().manual_seed(5))
    path = tmp_path / "h.safetensors"
    ak.save_scheduler(model, path)
    budgets = ["0.9", "0.7", "0.5"]
    rows, printed = run_main(["--variants", "H", "--budgets", *budgets, "--scheduler", str(path),
                              "--out", str(tmp_path / "out"), *FAST])
    assert "rank 4 |" in printed and [r["rank"] for r in rows] == ["4"] * 3
    inputs = example_inputs(model)
    for row, budget in zip(rows, budgets):
        plan = ak.plan(model, latency_budget=float(budget), **inputs)
        assert row["executed_layers"] == " ".join(map(str, plan.layers[0].nonzero().flatten().tolist()))
        assert f"  {plan.summary()}\n" in printed  # heads and groups per executed layer
    with pytest.raises(SystemExit) as exit_info:  # a --rank given is kept: this file is refused
        run_main(["--variants", "H", "--rank", "2", "--scheduler", str(path), "--out", str(tmp_path / "out"), *FAST])
    assert exit_info.value.code == 2


def test_without_matplotlib_the_plot_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    rows, printed = run_main(["--variants", "L", "--budgets", "0.5", "--out", str(tmp_path), *FAST])
    assert len(rows) == 1 and "matplotlib is not installed" in printed
    assert not (tmp_path / PNG_NAME).exists()
    assert main(["sweep", "--device", "cpu", "--variants", "L", "--budgets", "1.0", "--new-tokens", "1",
                 "--repeats", "1", "--out", str(tmp_path / "sweep")]) == 0
    assert (tmp_path / "sweep" / "sweep-tiny.csv").exists() and not (tmp_path / "sweep" / "sweep-tiny.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--budgets", "1.5"], "--budgets: budget must be a number in (0, 1]"),
    (["--budgets", "nan"], "--budgets: budget must be a number in (0, 1]"),
    (["--budgets", "0"], "--budgets: budget must be a number in (0, 1]"),
    (["--variants", "X"], "--variants: invalid choice: 'X' (choose from"),
    (["--rank", "3"], "--rank: 3 does not divide the model's 8 attention heads"),
    (["--rank", "0"], "--rank: must be a positive integer"),
    (["--repeats", "0"], "--repeats: must be a positive integer"),
    (["--threads", "0"], "--threads: must be a positive integer"),
    (["--seed", "-1"], "--seed: must be an integer in [0, 4294967295]"),
    (["--seed", str(2 ** 32)], "--seed: must be an integer in [0, 4294967295]"),
    (["--model", "/nonexistent/llava"], "--model: /nonexistent/llava is not a Hugging Face checkpoint folder"),
    (["--scheduler", "/nonexistent.safetensors", "--variants", "L"], "--scheduler: no such file"),
    (["--scheduler", __file__], "--scheduler: a scheduler file holds one variant's weights; pass a single --variants"),
])
def test_bad_arguments_exit_nonzero_naming_the_argument(argv, message, tmp_path, capsys):
    """A nonzero exit, and an error that names the argument and what it accepts, before anything is written."""
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path), *FAST])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert f"argument {message}" in err, err
    assert not (tmp_path / CSV_NAME).exists()


@pytest.mark.parametrize("seed", [0, 2 ** 32 - 1])
def test_seed_takes_both_ends_of_its_range(seed):
    """--seed accepts every integer in [0, 2**32 - 1], both ends included (the refusals just outside are above)."""
    assert build_parser().parse_args(["--seed", str(seed)]).seed == seed


def test_unreadable_files_exit_nonzero_before_any_timing(tmp_path, capsys):
    image_module = pytest.importorskip("PIL.Image")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"neither an image nor a safetensors file\n" * 8)
    pixels = torch.randint(0, 256, (64, 48, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image_module.fromarray(pixels.numpy()).save(tmp_path / "whole.jpg")
    jpeg = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])  # its header whole, half its pixel data
    out = str(tmp_path / "out")
    unreadable = "argument --image: {} is not an image Pillow can read"  # not the later "needs a processor"
    for argv, says in ((["--image", str(junk), "--out", out], unreadable.format(junk)),
                       (["--image", str(tmp_path / "truncated.jpg"), "--out", out],
                        unreadable.format(tmp_path / "truncated.jpg")),
                       (["--scheduler", str(junk), "--variants", "L", "--out", out], "is not a safetensors file"),
                       (["--out", str(junk)], "argument --out")):
        exits_naming(capsys, argv, says)
    assert not (tmp_path / "out" / CSV_NAME).exists()


def test_checkpoint_folders_that_cannot_run_exit_before_loading(tmp_path, capsys):
    """Another architecture's checkpoint (LLaVA's config would fall back to 7B defaults), a LLaVA model of an
    unsupported language model, a config without weights, weights lacking a tensor (it would be random), and an
    --out that cannot be a folder are refused by name before anything is timed."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=64)).save_pretrained(tmp_path / "llama")
    tiny_llava().config.save_pretrained(tmp_path / "config_only")
    config = tiny_llava().config.to_dict()
    config["text_config"]["model_type"] = "mistral"  # a LLaVA model of an unsupported language model
    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(json.dumps(config))
    (tmp_path / "bad_text_config").mkdir()
    (tmp_path / "bad_text_config" / "config.json").write_text(json.dumps({**config, "text_config": "llama"}))
    tiny_llava().save_pretrained(tmp_path / "lacking")
    weights = load_file(tmp_path / "lacking" / "model.safetensors")  # saved under transformers' legacy names
    del weights["language_model.model.layers.0.mlp.down_proj.weight"]
    save_file(weights, tmp_path / "lacking" / "model.safetensors", metadata={"format": "pt"})
    lacking = "model.language_model.layers.0.mlp.down_proj.weight"  # its name in the model
    (tmp_path / "file").write_text("not a folder")
    for argv, says in ((["--model", str(tmp_path / "llama")], "holds a 'llama' model"),
                       (["--model", str(tmp_path / "config_only")], "has no weights"),
                       (["--model", str(tmp_path / "mistral")], "language model is 'mistral'; adaptive-kernels runs"),
                       (["--model", str(tmp_path / "bad_text_config")], "is not a readable config"),
                       (["--model", str(tmp_path / "lacking")], f"lacks 1 of the model's tensors, first {lacking}"),
                       (["--out", str(tmp_path / "file" / "out")], "argument --out: cannot make the folder")):
        exits_naming(capsys, argv, says)
    with pytest.raises(SystemExit):
        main(["sweep", "--out", str(tmp_path / "file" / "out")])
    assert "argument --out: cannot make the folder" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs a folder no one can write files in, /proc")
def test_an_out_folder_that_cannot_be_written_is_refused_before_any_timing(tmp_path, capsys):
    """/proc takes no files, even from root (whom file modes do not stop): the main job and the sweep refuse it
    as --out before timing anything."""
    for argv in (["--variants", "L", "--budgets", "1.0", *FAST],
                 ["sweep", "--device", "cpu", "--variants", "L", "--budgets", "1.0", "--new-tokens", "1", "--repeats",
                  "1"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", "/proc"])
        captured = capsys.readouterr()
        assert exit_info.value.code == 2 and "Traceback" not in captured.err, captured.err
        assert "argument --out: the folder /proc cannot be written" in captured.err, captured.err
        assert "latency" not in captured.out


def test_unloadable_weights_and_output_files_that_are_folders_exit_naming_the_option(tmp_path, capsys):
    tiny_llava().save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not safetensors" * 8)
    (tmp_path / "out" / CSV_NAME).mkdir(parents=True)
    (tmp_path / "part" / f"{CSV_NAME}.part").mkdir(parents=True)  # where it is written first
    for argv, says in ((["--model", str(tmp_path / "ckpt")], "argument --model: cannot load"),
                       (["--out", str(tmp_path / "out")], f"argument --out: {tmp_path / 'out' / CSV_NAME} is a folder"),
                       (["--out", str(tmp_path / "part")],
                        f"argument --out: {tmp_path / 'part' / CSV_NAME}.part is a folder")):
        exits_naming(capsys, argv, says)


@pytest.mark.triton
def test_triton_on_the_cpu_outside_the_interpreter_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("adaptive_kernels.backends.INTERPRET", False)
    out = str(tmp_path / "out")
    for argv in (["--backend", "triton", "--out", out, *FAST],
                 ["sweep", "--device", "cpu", "--backends", "triton", "--out", out]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "TRITON_INTERPRET=1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything is made
    parser = build_parser()  # without --backend the default, torch on the cpu, is accepted
    _check_args(parser, parser.parse_args(["--out", out, *FAST]))


def test_the_cuda_backend_on_the_cpu_is_refused_in_the_command_lines_terms(tmp_path, capsys):
    """The advice names --device, which the command line has (the API's refusal advises model.to('cuda'))."""
    out = str(tmp_path / "out")
    for argv, option in ((["--device", "cpu", "--backend", "cuda", "--out", out, *FAST], "--backend"),
                         (["sweep", "--device", "cpu", "--backends", "torch", "cuda", "--out", out], "--backends")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"argument {option}: backend cuda runs CUDA kernels, but --device is " \
            "cpu; give --device cuda" in err and "model.to" not in err, err
    assert not any(tmp_path.iterdir())


def test_rank_need_not_divide_the_heads_for_variant_l(tmp_path):
    """--rank sizes H's units only: with L alone, a rank that does not divide the 8 heads runs."""
    rows, _ = run_main(["--rank", "3", "--variants", "L", "--budgets", "0.6", "--out", str(tmp_path), *FAST])
    assert [(r["variant"], r["budget"]) for r in rows] == [("L", "0.6")]


def test_processor_needs_an_image_processor_and_a_tokenizer(tmp_path):
    from adaptive_kernels.cli import _has_processor

    (tmp_path / "preprocessor_config.json").write_text("{}")
    assert not _has_processor(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    assert _has_processor(tmp_path)


def test_a_folder_where_the_plot_goes_is_refused_before_any_timing(tmp_path, capsys):
    """The plot is written after every budget was timed: a folder in its place is refused up front, naming --out,
    as one in the CSV's place is."""
    (tmp_path / "out" / PNG_NAME).mkdir(parents=True)
    exits_naming(capsys, ["--out", str(tmp_path / "out")], f"argument --out: {tmp_path / 'out' / PNG_NAME} is a folder")
    assert not (tmp_path / "out" / CSV_NAME).exists()


@pytest.mark.parametrize("refused", [["--scheduler", "{tmp}/none.safetensors", "--variants", "L"],
                                     ["--image", "{tmp}/none.png"], ["--prompt", "what?"],
                                     ["--scheduler", "{tmp}/junk", "--variants", "L", "--image", "{tmp}/junk"]])
def test_refused_options_leave_no_output_folder(refused, tmp_path, capsys):
    """The output folder is made last of the checks: an option refused (a missing file, a prompt without a
    processor, an unreadable image) leaves no --out folder behind."""
    (tmp_path / "junk").write_bytes(b"neither an image nor safetensors\n" * 4)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([*(a.format(tmp=tmp_path) for a in refused), "--out", str(out), *FAST])
    assert exit_info.value.code == 2 and "Traceback" not in capsys.readouterr().err
    assert not out.exists()


def test_a_checkpoint_on_the_cpu_keeps_torchs_threads(tmp_path, monkeypatch):
    """Without --threads only the built-in tiny model on the CPU runs on one thread; a --model there keeps torch's
    default (--threads' help). The job itself is faked: only its thread setting is looked at."""
    from adaptive_kernels import cli as cli_module

    tiny_llava().save_pretrained(tmp_path / "ckpt")
    seen = []
    monkeypatch.setattr(cli_module, "_main", lambda parser, args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for argv in (["--model", str(tmp_path / "ckpt")], [], ["--model", str(tmp_path / "ckpt"), "--threads", "2"]):
            assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert seen == [3, 1, 2]


def test_variant_h_takes_a_rank_of_all_the_heads(tmp_path):
    """--rank must divide the attention heads for variant H (8 here, 4 key/value heads): 8, one unit per layer, runs;
    its plans hold whole layers' heads."""
    rows, printed = run_main(["--variants", "H", "--rank", "8", "--budgets", "0.6", "--out", str(tmp_path), *FAST])
    assert [(r["variant"], r["rank"]) for r in rows] == [("H", "8")] and "rank 8 |" in printed


def test_a_checkpoint_whose_text_config_omits_its_model_type_runs_as_llama(tmp_path):
    """LlavaConfig reads a text_config without model_type as llama: such a checkpoint is a supported one, and its
    tokens are the built-in model's with the same weights."""
    tiny_llava().save_pretrained(tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    del config["text_config"]["model_type"]
    config_file.write_text(json.dumps(config))
    argv = ["--rank", "2", "--variants", "L", "--budgets", "1.0", *FAST]
    rows, _ = run_main(["--model", str(tmp_path / "ckpt"), *argv, "--out", str(tmp_path / "out")])
    builtin, _ = run_main([*argv, "--out", str(tmp_path / "builtin")])
    assert len(rows) == 1 and rows[0]["tokens"] == builtin[0]["tokens"]


@pytest.mark.parametrize("device, dtype", [("cpu", "float32"), ("cuda", "bfloat16")])
def test_the_default_dtype_is_float32_on_the_cpu_and_bfloat16_on_cuda(device, dtype, tmp_path, monkeypatch):
    """--dtype's help: the model is timed in bfloat16 on cuda and in float32 on the cpu unless told; the job gets
    that dtype (a --dtype given is kept). CUDA is faked and the job itself too: only its arguments are looked at."""
    from adaptive_kernels import cli as cli_module

    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(cli_module, "_main", lambda parser, args: seen.append(args.dtype) or 0)
    for given in ([], ["--dtype", "float16"]):
        assert main(["--device", device, "--backend", "torch", *given, "--out", str(tmp_path / "out")]) == 0
    assert seen == [dtype, "float16"]


def test_python_m_help():
    done = subprocess.run([sys.executable, "-m", "adaptive_kernels", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: adaptive-kernels")
    for option in ("--model", "--device", "--dtype", "--variants", "--budgets", "--rank", "--max-new-tokens",
                   "--repeats", "--backend", "--scheduler", "--out"):
        assert option in done.stdout
    assert "the checkpoint's own generation settings are not used" in " ".join(done.stdout.split())


def test_sweep_subcommand_writes_rows_plot_and_adherence(tmp_path, capsys):
    import json

    from adaptive_kernels.sweep import read_records

    assert main(["sweep", "--device", "cpu", "--variants", "L", "L", "--budgets", "1.0", "0.5", "1", "--new-tokens",
                 "1", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep-tiny.csv")))
    assert sum(r["system"] == "adaptive" for r in rows) == 2  # repeated variants and budgets run once
    adaptive = {float(r["budget"]): r for r in rows if r["system"] == "adaptive"}
    assert set(adaptive) == {1.0, 0.5} and {r["system"] for r in rows} >= {"stock", "ideal", "masked"}
    assert float(adaptive[0.5]["cost"]) == 0.5  # 4 prefix + 0 scheduled of 8 layers
    masked = [r for r in rows if r["system"] == "masked"]
    assert len(masked) == 2  # prefill and decode measured
    # per token, a difference of medians: NaN where noise made more tokens take no longer (seen on the CPU)
    assert all(float(r["prefill_ms"]) > 0 and not math.isinf(float(r["decode_ms_per_token"])) for r in masked)
    assert {(r["dtype"], r["rank"], r["new_tokens"], r["repeats"]) for r in rows} == {("float32", "2", "1", "1")}
    assert all(r["triton"] and r["device"] for r in rows)
    cpu_info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu_models = [line.split(":", 1)[1].strip() for line in cpu_info if line.startswith("model name")]
    if cpu_models:  # Linux names the CPU's model (platform.processor() gives only the architecture there)
        assert {r["device"] for r in rows} == {cpu_models[0]}

    def strict(token):
        raise AssertionError(f"{token} is not JSON")

    for name in ("sweep-tiny.json", "sweep-tiny-adherence.json", "sweep-tiny-targets.json"):
        json.loads((tmp_path / name).read_text(), parse_constant=strict)
    for a in read_records(tmp_path / "sweep-tiny-adherence.json"):  # null (not measured) read back as NaN
        phase = "prefill_ms" if a["phase"] == "prefill" else "decode_ms_per_token"
        excesses = [float(r[phase]) / float(adaptive[1.0][phase]) - float(r["cost"]) for b, r in adaptive.items()
                    if b < 1.0]
        measured = [e for e in excesses if not math.isnan(e)]  # decode at 0.5 may be NaN: see masked above
        assert a["largest_excess"] == pytest.approx(max(measured) if measured else math.nan, nan_ok=True)
    for row in adaptive.values():  # the cached keys and values on top of the active weights
        assert 0 < float(row["decode_weight_floor_ms"]) < float(row["decode_floor_ms"])
    assert 0 < float(adaptive[0.5]["decode_floor_ms"]) < float(adaptive[1.0]["decode_floor_ms"])
    ideal = {float(r["budget"]): r for r in rows if r["system"] == "ideal"}
    assert 0 < float(adaptive[0.5]["prefill_floor_ms"]) < float(adaptive[1.0]["prefill_floor_ms"])
    for budget, row in ideal.items():  # the same plan's work, on the prompt and the latency token
        assert row["prefill_floor_ms"] == adaptive[budget]["prefill_floor_ms"]
    targets = read_records(tmp_path / "sweep-tiny-targets.json")
    assert sorted(t["budget"] for t in targets) == [0.5, 1.0]
    for t in targets:
        row = adaptive[t["budget"]]
        assert t["prefill_vs_ideal"] == pytest.approx(float(row["prefill_ms"]) / float(ideal[t["budget"]]["prefill_ms"]))
        for floor in ("floor", "weight_floor"):
            assert t[f"decode_vs_{floor}"] == pytest.approx(
                float(row["decode_ms_per_token"]) / float(row[f"decode_{floor}_ms"]), nan_ok=True)
        assert t["schedule_share_of_prefill"] == pytest.approx(float(row["schedule_ms"]) / float(row["prefill_ms"]))
        for cuda_only in ("prefill_kernel_vs_ideal", "schedule_share_of_prefill_kernels", "decode_vs_compiled_stock"):
            assert math.isnan(t[cuda_only]), cuda_only
    assert (tmp_path / "sweep-tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "adherence L torch prefill" in printed and "decode/floor (1.3)" in printed


def test_prefill_floor_is_the_plans_flops_at_the_rate_given():
    """``prefill_floor_ms``: per executed layer the q/k/v/o products of its heads (k and v of each key/value
    head any of its query heads uses), the gate/up/down products of its neurons and attention over the causal
    query-key pairs, plus lm_head over every position; counted here by hand from a random plan's masks."""
    import numpy as np

    from adaptive_kernels.sweep import prefill_floor_ms

    model = tiny_llava()
    text = model.config.text_config
    D, H, KV, M, V = text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.intermediate_size, \
        text.vocab_size
    d, T, rate = D // H, 37, 3.5e11
    gen = torch.Generator().manual_seed(5)
    layers = torch.rand(1, text.num_hidden_layers, generator=gen) < 0.7
    heads = (torch.rand(1, text.num_hidden_layers, H, generator=gen) < 0.6) & layers[..., None]
    groups = (torch.rand(1, text.num_hidden_layers, H, generator=gen) < 0.6) & layers[..., None]
    neurons_per_group = [len(part) for part in np.array_split(np.arange(M), H)]
    flops = 2 * T * D * V
    for layer in range(text.num_hidden_layers):
        if not layers[0, layer]:
            continue
        on = heads[0, layer].tolist()
        q = sum(on)
        kv = sum(any(on[k * (H // KV):(k + 1) * (H // KV)]) for k in range(KV))
        neurons = sum(n for n, g in zip(neurons_per_group, groups[0, layer].tolist()) if g)
        flops += 2 * T * D * d * (2 * q + 2 * kv) + 3 * 2 * T * D * neurons + 2 * 2 * d * q * T * (T + 1) // 2
    floor = prefill_floor_ms(model, ak.ExecutionPlan(layers, heads, groups), T, rate)
    assert floor == pytest.approx(flops / rate * 1e3, rel=1e-12)


def test_a_failed_sweep_measurement_costs_only_its_own_rows(tmp_path, capsys, monkeypatch):
    from adaptive_kernels import sweep as sweep_module

    real_plan, built = sweep_module.plan, []

    def plan_failing_below_one(model, latency_budget, **inputs):
        if latency_budget < 1.0:
            raise RuntimeError("planted failure")
        return real_plan(model, latency_budget=latency_budget, **inputs)

    def build_model(device, dtype):
        built.append(tiny_llava().to(dtype))
        return built[-1], "tiny", TINY_RANK

    monkeypatch.setattr(sweep_module, "plan", plan_failing_below_one)  # fails with the model patched
    monkeypatch.setattr(sweep_module, "build_model", build_model)
    assert main(["sweep", "--device", "cpu", "--variants", "L", "--budgets", "0.5", "1.0", "0.6", "--new-tokens", "1",
                 "--repeats", "1", "--out", str(tmp_path)]) == 1
    rows = list(csv.DictReader(open(tmp_path / "sweep-tiny.csv")))
    measured = sorted((r["system"], float(r["budget"])) for r in rows)
    assert measured == [("adaptive", 1.0), ("ideal", 1.0), ("masked", 1.0), ("stock", 1.0)]
    assert float(next(r for r in rows if r["system"] == "adaptive")["cost"]) == 1.0
    assert (tmp_path / "sweep-tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    err = capsys.readouterr().err
    assert "Traceback" in err and "FAILED L torch 0.5: RuntimeError: planted failure" in err, err
    assert "FAILED L torch 0.6: RuntimeError: planted failure" in err, err
    (model,) = built  # left stock by the last, failed, measurement
    stock = tiny_llava()
    assert type(model.model.language_model) is type(stock.model.language_model)
    assert model.state_dict().keys() == stock.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), stock.state_dict().values()))


@pytest.mark.parametrize("device, given", [("cpu", ("triton", "torch")), ("cuda", None)])
def test_each_plans_stock_references_are_measured_once_with_the_first_backend(device, given, tmp_path, monkeypatch):
    """With two backends every (variant, backend, budget) plan is measured, and the stock references of each
    variant's plan at each budget (masked, ideal) once, with the first backend given (here triton): with every
    backend they were measured, and written as rows, twice. On CUDA with no backends given those are triton, then
    torch (issue 4), and compiled stock is measured once. The run is faked: only the sweep's job loop runs."""
    from adaptive_kernels import sweep as sweep_module

    measured = []

    class Run:
        def __init__(self, device_, new_tokens, repeats, out_dir):
            assert (device_, new_tokens, repeats, out_dir) == (device, 2, 1, tmp_path)
            self.rows, self.failures, self.stem = [], [], "sweep-faked"

        def measure_stock(self):
            measured.append("stock")

        def measure_compiled_stock(self):
            measured.append("compiled stock")

        def attempt(self, name, job, *args):
            job(*args)

        def measure_plan(self, variant, backend, budget, references):
            measured.append((variant, backend, budget, references))

    monkeypatch.setattr(sweep_module, "_SweepRun", Run)
    monkeypatch.setattr(sweep_module, "plot_rows", lambda rows, path: None)
    variants, backends, budgets = ("H", "L"), ("triton", "torch"), (0.6, 1.0, 0.8)
    assert sweep_module._sweep(device, variants, given, budgets, 2, 1, tmp_path, False) == []
    assert measured[0] == "stock" and measured.count("compiled stock") == (device == "cuda")
    plans = [m for m in measured[1:] if m != "compiled stock"]
    assert sorted(p[:3] for p in plans) == sorted((v, be, b) for v in variants for be in backends for b in budgets)
    assert sorted(p[:3] for p in plans if p[3]) == sorted((v, "triton", b) for v in variants for b in budgets)


SWEEP_ROW = dict(model="m", variant="L", backend="torch", vision_ms=1.0, device="cpu", dtype="float32", rank=2,
                 new_tokens=1, repeats=1, torch="t", transformers="t", triton="t", date="d")


class RandomTimings:
    """Fresh random timings, in [1, 10) ms, from a generator seeded with ``seed``."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def ms(self) -> float:
        return 1.0 + 9.0 * float(torch.rand((), generator=self.gen))

    def prefill(self) -> dict:
        """A prefill's wall, GPU kernel and graph-replay times, as Row fields."""
        return dict(prefill_ms=self.ms(), prefill_kernel_ms=self.ms(), prefill_graph_ms=self.ms())


def test_adherence_is_the_latency_share_minus_the_plans_cost():
    """Per variant, backend and phase: the largest of t(b) / t(1.0) - cost(b) over the budgets below 1.0, with the
    budget where it is, negative where every budget beat its cost. H plans cost less than their budget (whole
    units), so the cost, not the budget, is what latency is held to."""
    from adaptive_kernels.sweep import Row, budget_adherence

    common = {**SWEEP_ROW, "system": "adaptive", "variant": "H"}
    timings = {"torch": [(0.8, 0.7, 8.0, 3.0), (1.0, 1.0, 10.0, 4.0), (0.6, 0.45, 5.0, 2.6)],  # 1.0 anywhere
               "triton": [(1.0, 1.0, 20.0, 2.0), (0.6, 0.45, 8.0, 1.0)]}
    rows = [Row(budget=b, cost=c, prefill_ms=p, decode_ms_per_token=d, **{**common, "backend": backend})
            for backend, series in timings.items() for b, c, p, d in series]
    found = {(a["backend"], a["phase"]): (a["largest_excess"], a["at_budget"]) for a in budget_adherence(rows)}
    assert found.keys() == {(backend, phase) for backend in timings for phase in ("prefill", "decode")}
    for backend, series in timings.items():
        (full,) = [row for row in series if row[0] == 1.0]
        for phase, column in (("prefill", 2), ("decode", 3)):
            excess = {row[0]: row[column] / full[column] - row[1] for row in series if row[0] < 1.0}
            worst = max(excess, key=excess.get)
            assert found[backend, phase] == (pytest.approx(excess[worst]), worst)
    assert found["triton", "prefill"] == (pytest.approx(8.0 / 20.0 - 0.45), 0.6)  # below 1.0's excess, which is 0


def test_adherence_skips_a_budget_not_measured_wherever_it_comes():
    """A timing that failed (NaN) at one budget leaves the largest excess of the others, also when that budget
    comes first (``--budgets 0.6 1.0 0.8``)."""
    from adaptive_kernels.sweep import Row, budget_adherence

    series = [(0.6, 0.55, float("nan")), (1.0, 1.0, 10.0), (0.8, 0.75, 8.0)]
    rows = [Row(system="adaptive", budget=b, cost=c, prefill_ms=p, **SWEEP_ROW) for b, c, p in series]
    (prefill,) = budget_adherence(rows)
    assert prefill["largest_excess"] == pytest.approx(8.0 / 10.0 - 0.75) and prefill["at_budget"] == 0.8


def test_a_zero_timing_gives_nan_ratios_not_a_stopped_sweep():
    """A timer that saw nothing (0 ms) makes its ratios NaN; adherence and targets, computed as each row is
    written, must not raise, or every later row of the sweep would be lost."""
    from adaptive_kernels.sweep import Row, budget_adherence, target_ratios

    common = {**SWEEP_ROW, "decode_floor_ms": 0.0, "decode_weight_floor_ms": 0.0}
    rows = [Row(system="adaptive", budget=1.0, cost=1.0, prefill_ms=0.0, decode_ms_per_token=2.0, schedule_ms=0.1,
                **common),
            Row(system="adaptive", budget=0.5, cost=0.5, prefill_ms=1.0, decode_ms_per_token=1.5, schedule_ms=0.1,
                **common),
            Row(system="ideal", budget=0.5, cost=0.5, prefill_ms=0.0, decode_ms_per_token=1.0, **common)]
    prefill = next(a for a in budget_adherence(rows) if a["phase"] == "prefill")
    assert math.isnan(prefill["largest_excess"])  # latency at 1.0 read 0: no share to compare
    decode = next(a for a in budget_adherence(rows) if a["phase"] == "decode")
    assert decode["largest_excess"] == pytest.approx(0.25) and decode["at_budget"] == 0.5
    for t in target_ratios(rows):
        assert math.isnan(t["decode_vs_floor"]) and math.isnan(t["decode_vs_weight_floor"])
        assert t["budget"] == 1.0 or math.isnan(t["prefill_vs_ideal"])
        assert math.isnan(t["schedule_share_of_prefill"]) == (t["budget"] == 1.0)


def test_decode_timing_splits_steady_steps_from_the_setup_of_the_first_two():
    """With t(n) = prefill + (n - 1) steady steps + a setup paid once by the first two decode steps, decode_timing
    gives the steady step, (t(n + 3) - t(3)) / n, and the setup, t(3) - t(1) - 2 * per_token."""
    from adaptive_kernels.sweep import decode_timing

    prefill, step, setup, n = 7.0, 1.5, 4.0, 16
    asked = []

    def generate(tokens: int) -> float:
        asked.append(tokens)
        return prefill + (tokens - 1) * step + (setup if tokens >= 3 else 0.0)

    def median_ms(fn, repeats: int) -> float:
        assert repeats == 5
        return fn()

    per_token, setup_ms = decode_timing(generate, n, median_ms, 5)
    t = {tokens: generate(tokens) for tokens in (1, 3, n + 3)}
    assert sorted(set(asked)) == [1, 3, n + 3]
    assert per_token == pytest.approx((t[n + 3] - t[3]) / n) and per_token == pytest.approx(step)
    assert setup_ms == pytest.approx(t[3] - t[1] - 2 * per_token) and setup_ms == pytest.approx(setup)


@pytest.mark.parametrize("longer_minus_shorter", [0.0, -3.0])
def test_decode_timing_is_nan_where_more_tokens_did_not_take_longer(longer_minus_shorter):
    """Noise larger than n steps (t(n + 3) <= t(3)) gives no time per token, rather than one of 0 or less that
    a targets table would count as met."""
    from adaptive_kernels.sweep import decode_timing

    times = {1: 5.0, 3: 9.0, 19: 9.0 + longer_minus_shorter}
    per_token, setup_ms = decode_timing(times.__getitem__, 16, lambda fn, repeats: fn(), 3)
    assert math.isnan(per_token) and math.isnan(setup_ms)


def test_decode_times_on_cuda_give_the_steady_kernel_time_per_token_and_a_positive_setup(monkeypatch):
    """_SweepRun.decode_times with faked clocks: a generated token costs 1.5 ms of wall time and 0.25 ms of kernels,
    and the 2nd and 3rd tokens 3 ms and 1.25 ms more, once. decode_kernel_ms is the steady kernel time per token,
    from generate(n + 3) and generate(3) (from generate(1), the first steps' extra kernels counted in it, it read
    0.54); decode_setup_ms is what the first two decode steps cost beyond two steady ones, +3 (not -3); on the CPU
    no kernel time is taken."""
    from adaptive_kernels import sweep as sweep_module

    asked = []

    class Model:
        def generate(self, inputs_embeds, attention_mask, do_sample, max_new_tokens, min_new_tokens):
            assert (inputs_embeds, attention_mask, do_sample, min_new_tokens) == ("embeds", "mask", False,
                                                                                  max_new_tokens)
            asked.append(max_new_tokens)

    def median_ms(fn, repeats):
        assert repeats == 2
        fn()
        return 12.0 + 1.5 * asked[-1] + (3.0 if asked[-1] >= 3 else 0.0)

    def kernel_ms(fn):
        fn()
        return 2.0 + 0.25 * asked[-1] + (1.25 if asked[-1] >= 3 else 0.0)

    monkeypatch.setattr(sweep_module, "kernel_ms", kernel_ms)
    run = object.__new__(sweep_module._SweepRun)  # its clocks and settings only: no model built
    run.device, run.new_tokens, run.repeats, run.median_ms, run.failures = "cuda", 6, 2, median_ms, []
    times = run.decode_times(Model(), "embeds", "mask", kernels=True)
    assert times.keys() == {"decode_ms_per_token", "decode_setup_ms", "decode_kernel_ms"}
    assert times["decode_ms_per_token"] == pytest.approx(1.5, rel=1e-12)
    assert times["decode_setup_ms"] == pytest.approx(3.0, rel=1e-12)
    assert times["decode_kernel_ms"] == pytest.approx(0.25, rel=1e-12)
    assert sorted(set(asked)) == [1, 3, 9] and run.failures == []
    run.device = "cpu"
    monkeypatch.setattr(sweep_module, "kernel_ms", lambda fn: pytest.fail("kernel time taken on the cpu"))
    times = run.decode_times(Model(), "embeds", "mask", kernels=True)
    assert times["decode_setup_ms"] == pytest.approx(3.0, rel=1e-12) and math.isnan(times["decode_kernel_ms"])


def test_decode_is_compared_with_compiled_stock_at_full_budget_only():
    """decode_vs_compiled_stock is adaptive decode per token over compiled stock's at budget 1.0 (both full
    models), and NaN at every other budget; NaN throughout without a compiled stock row."""
    from adaptive_kernels.sweep import Row, target_ratios

    decode = {("L", 1.0): 4.0, ("L", 0.7): 3.0, ("L", 0.5): 2.5, ("H", 0.6): 3.5, ("H", 1.0): 5.0}
    adaptive = [Row(system="adaptive", budget=b, cost=b, prefill_ms=1.0, decode_ms_per_token=d,
                    **{**SWEEP_ROW, "variant": v}) for (v, b), d in decode.items()]
    compiled = Row(system="stock-static-compiled", budget=1.0, cost=1.0, prefill_ms=float("nan"),
                   decode_ms_per_token=2.0, **{**SWEEP_ROW, "variant": "-", "backend": "transformers"})
    ratios = target_ratios([adaptive[0], compiled, *adaptive[1:]])
    assert sorted((t["variant"], t["budget"]) for t in ratios) == sorted(decode)
    for t in ratios:
        if t["budget"] == 1.0:
            assert t["decode_vs_compiled_stock"] == pytest.approx(decode[t["variant"], 1.0] / 2.0)
        else:
            assert math.isnan(t["decode_vs_compiled_stock"]), t
    assert all(math.isnan(t["decode_vs_compiled_stock"]) for t in target_ratios(adaptive))


def test_a_rewrite_replaces_the_file_whole(tmp_path, monkeypatch):
    """The sweep and the benchmarks rewrite their files after each row, and a time limit may kill them at any
    point: until a rewrite is done the previous file stays whole, and a rewrite that fails, or is interrupted
    (Ctrl-C, a KeyboardInterrupt, which is no Exception), leaves it and no part file."""
    from adaptive_kernels.measuring import whole_file
    from adaptive_kernels.sweep import Row, write_records

    path = tmp_path / "f.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="cut"), whole_file(path) as f:
        f.write("new, half")
        f.flush()
        assert path.read_text() == "old"
        raise RuntimeError("cut")
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]
    with pytest.raises(KeyboardInterrupt), whole_file(path) as f:
        f.write("new, interrupted")
        f.flush()
        assert (tmp_path / "f.json.part").read_text() == "new, interrupted"
        raise KeyboardInterrupt
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]
    with whole_file(path) as f:
        f.write("new")
    assert path.read_text() == "new" and sorted(tmp_path.iterdir()) == [path]
    folder = tmp_path / "a folder"  # the rename fails, after the part file was written
    folder.mkdir()
    with pytest.raises(OSError), whole_file(folder) as f:
        f.write("new")
    assert sorted(tmp_path.iterdir()) == [folder, path]

    rows = [Row(system="stock", budget=1.0, cost=1.0, prefill_ms=10.0, decode_ms_per_token=4.0, **SWEEP_ROW)]
    write_records(rows, tmp_path, "rows")
    names = ("rows.csv", "rows.json", "rows-adherence.json", "rows-targets.json")
    written = {name: (tmp_path / name).read_text() for name in names}
    writerows = csv.DictWriter.writerows
    seen = []

    def write_and_look(writer, records):  # mid-rewrite, what a reader sees
        writerows(writer, records)
        seen.append({name: (tmp_path / name).read_text() for name in names})

    monkeypatch.setattr(csv.DictWriter, "writerows", write_and_look)
    write_records(rows * 2, tmp_path, "rows")
    assert seen == [written]


def test_records_read_back_field_for_field_with_nan_as_nan(tmp_path):
    """read_records gives back every field write_records wrote; a NaN or an infinity (not measured or not a number,
    null in the JSON) comes back as NaN, not as a number."""
    from dataclasses import asdict

    from adaptive_kernels.sweep import Row, read_records, write_records

    nan = float("nan")
    rows = [Row(system="adaptive", budget=1.0, cost=1.0, prefill_ms=10.0, decode_ms_per_token=4.0, schedule_ms=0.25,
                decode_floor_ms=1.5, **SWEEP_ROW),
            Row(system="adaptive", budget=0.5, cost=0.5, prefill_ms=6.0, decode_ms_per_token=nan,
                decode_setup_ms=-0.5, schedule_ms=float("inf"), **SWEEP_ROW),
            Row(system="stock-static-compiled", budget=1.0, cost=1.0, prefill_ms=nan, decode_ms_per_token=2.0,
                **{**SWEEP_ROW, "variant": "-", "backend": "transformers"})]
    write_records(rows, tmp_path, "round")
    assert "null" in (tmp_path / "round.json").read_text()  # the NaNs went through as nulls
    back = read_records(tmp_path / "round.json")
    assert len(back) == len(rows)
    for row, got in zip(rows, back):
        want = asdict(row)
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float) and not math.isfinite(value):
                assert isinstance(got[key], float) and math.isnan(got[key]), (key, got[key])
            else:
                assert got[key] == value and type(got[key]) is type(value), (key, got[key], value)


def test_copy_bandwidth_counts_the_bytes_read_and_the_bytes_written(monkeypatch):
    """copy_bandwidth is (bytes read + bytes written) / seconds of the median copy: twice the copied tensor's
    size over the median of its timed copies."""
    from adaptive_kernels import measuring

    copied, times = [], [9.0, 0.5, 2.0, 2.0, 30.0] * 4  # median 2 ms

    def once_ms(fn, device):
        assert device == "cpu"
        copied.append(fn())  # the copy's destination: as many bytes are read from the source
        return times[len(copied) - 1]

    monkeypatch.setattr(measuring, "_once_ms", once_ms)
    bandwidth = measuring.copy_bandwidth("cpu")
    assert len(copied) == len(times)
    nbytes = copied[0].numel() * copied[0].element_size()
    assert nbytes == 64 * 2 ** 20  # 64 MiB on the CPU
    assert bandwidth == pytest.approx(2 * nbytes / 2e-3)
    copied.clear()
    times[:] = [t / 2 for t in times]  # measured again at each call (a sweep's own threads), not kept
    assert measuring.copy_bandwidth("cpu") == pytest.approx(2 * bandwidth)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_floor_reads_the_executed_weights_and_cache_at_the_bandwidth(dtype):
    """decode_floor_ms of row 0 is the ms to read, at the bandwidth, the weights a decode step touches (its
    executed layers' norms, active heads' q/k/v/o slices and MLP, the final norm, lm_head) and the cached keys and
    values of its active key/value heads; counted here from the model's own parameters."""
    from adaptive_kernels import ExecutionPlan
    from adaptive_kernels.sweep import decode_floor_ms

    model = tiny_llava(seed=5).to(dtype)  # 2- or 4-byte elements, in the weights and the cache
    text = model.model.language_model
    config = model.config.text_config
    L, H, KV = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // H
    cached, bandwidth, element = 37, 3e9, dtype.itemsize

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def layer_bytes(layer, heads: list[int]) -> int:
        """Bytes of one executed layer with query heads ``heads`` on and every MLP neuron."""
        attn, kv_heads = layer.self_attn, sorted({h // (H // KV) for h in heads})
        q_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
        kv_rows = torch.cat([torch.arange(k * d, (k + 1) * d) for k in kv_heads])
        cache = 2 * len(kv_heads) * d * cached * element  # keys and values
        return (nbytes(layer.input_layernorm.weight) + nbytes(layer.post_attention_layernorm.weight)
                + nbytes(attn.q_proj.weight[q_rows]) + nbytes(attn.o_proj.weight[:, q_rows])
                + nbytes(attn.k_proj.weight[kv_rows]) + nbytes(attn.v_proj.weight[kv_rows]) + cache
                + sum(nbytes(p) for p in layer.mlp.parameters()))

    head = nbytes(model.lm_head.weight) + nbytes(text.norm.weight)

    def floor(plan) -> float:
        return decode_floor_ms(model, plan, cached, bandwidth)

    full = sum(nbytes(p) for layer in text.layers for p in layer.parameters()) + L * 2 * KV * d * cached * element
    assert floor(ExecutionPlan.full(1, L, H)) == pytest.approx((full + head) / bandwidth * 1e3, rel=1e-12)

    on = [0, 1, 2, 3, 6]  # the prefix and one more layer; in layer 6 query heads 0, 1 and 5 (key/value heads 0, 2)
    layers = torch.zeros(2, L, dtype=torch.bool)
    layers[0, on], layers[1] = True, True
    heads, groups = layers[:, :, None].repeat(1, 1, H), layers[:, :, None].repeat(1, 1, H)
    heads[0, 6] = False
    heads[0, 6, [0, 1, 5]] = True
    expected = sum(layer_bytes(text.layers[l], [0, 1, 5] if l == 6 else list(range(H))) for l in on) + head
    partial = floor(ExecutionPlan(layers, heads, groups))  # row 1 runs everything: row 0 is the one read
    assert partial == pytest.approx(expected / bandwidth * 1e3, rel=1e-12)
    assert partial < floor(ExecutionPlan.full(1, L, H))


def test_sweep_rows_time_each_plan_and_carry_its_budget_cost_and_floor(tmp_path, monkeypatch):
    """Timed by a clock that counts FLOPs: each adaptive row runs the model at its own budget; the masked computation
    does the full model's work on the prompt and the latency token at every budget, the ideal (the model cut to the
    plan) less below 1.0. The masked and ideal rows carry their adaptive row's budget and plan cost (an L plan at
    0.7 costs 0.625); decode floors count the cached prompt, plus the latency token where it is fed; the ideal, a
    prefill reference, has no decode timing; every row is stamped with new_tokens and repeats; the first budget
    is measured first. The references' prompts are the prompt and the latency token of their budget, each time
    they are fed one (the masked computation's prefill and generate, the ideal's prefill). A budget given as a numpy
    float32 is read as written (its rows were lost, each failing to be written as JSON)."""
    from torch.utils.flop_counter import FlopCounterMode

    from adaptive_kernels import ExecutionPlan
    from adaptive_kernels import measuring
    from adaptive_kernels import sweep as sweep_module
    from adaptive_kernels.sweep import decode_floor_ms, sweep

    built, forward_budgets, reference_prompts = [], [], []

    def record_inputs(module, args, kwargs):
        """The budget of each patched forward (a float, or generate's one per row); the prompt of each stock
        reference's, with the budget last seen."""
        budget = kwargs.get("latency_budget")
        if budget is not None:
            forward_budgets.append(budget)
        elif kwargs.get("inputs_embeds") is not None:  # the stock row's prompt before any budget
            last = float(np.ravel(forward_budgets[-1])[0]) if forward_budgets else None
            reference_prompts.append((last, kwargs["inputs_embeds"].clone()))

    def build_model(device, dtype):
        model = tiny_llava().to(dtype)
        model.register_forward_pre_hook(record_inputs, with_kwargs=True)
        built.append(model)
        return model, "tiny", TINY_RANK

    def sliced_stock_recorded(*args):
        ideal = sliced_stock(*args)
        ideal.register_forward_pre_hook(record_inputs, with_kwargs=True)
        return ideal

    def flop_clock(fn, device) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e6

    bandwidth = 1e9
    monkeypatch.setattr(sweep_module, "build_model", build_model)
    monkeypatch.setattr(measuring, "_once_ms", flop_clock)
    monkeypatch.setattr(sweep_module, "copy_bandwidth", lambda device: bandwidth)
    monkeypatch.setattr(sweep_module, "sliced_stock", sliced_stock_recorded)
    budgets = (1.0, 0.7)
    rows = sweep("cpu", variants=("L",), budgets=(1.0, np.float32(0.7)), new_tokens=2, repeats=1, out_dir=tmp_path,
                 progress=False)
    assert {(r.new_tokens, r.repeats) for r in rows} == {(2, 1)}
    assert [r.budget for r in rows if r.system == "adaptive"] == list(budgets)
    assert forward_budgets.count(0.7) == forward_budgets.count(1.0) > 0  # the same timings, each at its own budget
    prefill = {(r.system, r.budget): r.prefill_ms for r in rows}
    assert prefill["adaptive", 0.7] < prefill["adaptive", 1.0]
    assert prefill["masked", 0.7] == prefill["masked", 1.0] == prefill["ideal", 1.0] > prefill["stock", 1.0]
    assert prefill["ideal", 0.7] < prefill["ideal", 1.0]

    (model,) = built
    inputs = example_inputs(model)  # the sweep's prompt on the CPU
    embeds = prompt_embeddings(model, inputs)
    patched = ak.patch(copy.deepcopy(model), "L", rank=TINY_RANK)
    plans = {b: ak.plan(patched, latency_budget=b, inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
             for b in budgets}
    cost = {b: float(p.cost()[0]) for b, p in plans.items()}
    assert cost[0.7] != 0.7  # the cost, not the budget, is what the references carry
    # the stock row's prompt, as the sweep made it (on one thread: it differs from embeds in rounding)
    stock_prompt = next(p for budget, p in reference_prompts if budget is None)
    for b in budgets:
        fed = [p for budget, p in reference_prompts if budget == b]
        want = torch.cat([stock_prompt, ak.latency_embedding(patched, b)[None, None]], 1)
        assert len(fed) >= 3 and all(torch.equal(p, want) for p in fed), b
    found = {(r.system, r.budget): r for r in rows}
    assert found.keys() == {("stock", 1.0)} | {(s, b) for s in ("adaptive", "masked", "ideal") for b in budgets}
    for b in budgets:
        assert [found[s, b].cost for s in ("adaptive", "masked", "ideal")] == [cost[b]] * 3
        assert math.isnan(found["ideal", b].decode_ms_per_token) and math.isnan(found["ideal", b].decode_setup_ms)
    n = embeds.shape[1]
    config = model.config.text_config
    full = ExecutionPlan.full(1, config.num_hidden_layers, config.num_attention_heads)
    assert found["stock", 1.0].decode_floor_ms == pytest.approx(decode_floor_ms(model, full, n, bandwidth), rel=1e-12)
    weights = decode_floor_ms(model, full, 0, bandwidth)  # no cached keys and values
    assert found["stock", 1.0].decode_weight_floor_ms == pytest.approx(weights, rel=1e-12)
    for b in budgets:
        want = decode_floor_ms(model, plans[b], n + 1, bandwidth)
        assert found["adaptive", b].decode_floor_ms == pytest.approx(want, rel=1e-12)
        weights = decode_floor_ms(model, plans[b], 0, bandwidth)
        assert found["adaptive", b].decode_weight_floor_ms == pytest.approx(weights, rel=1e-12)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sweep_jobs_run_every_variant_at_a_budget_before_the_next_budget(device):
    """A sweep cut off by its time limit has each variant at the budgets it reached (it had one variant's whole
    curve and none of the other's): the first backend's plans budget by budget, on CUDA compiled stock after the
    first budget, then the next backend's; each job once."""
    from adaptive_kernels.sweep import COMPILED_STOCK, job_order

    compiled = [COMPILED_STOCK] if device == "cuda" else []
    expected = [("L", "triton", 1.0), ("H", "triton", 1.0), *compiled, ("L", "triton", 0.5), ("H", "triton", 0.5),
                ("L", "triton", 0.8), ("H", "triton", 0.8), ("L", "torch", 1.0), ("H", "torch", 1.0),
                ("L", "torch", 0.5), ("H", "torch", 0.5), ("L", "torch", 0.8), ("H", "torch", 0.8)]
    assert job_order(device, ("L", "H"), ("triton", "torch"), (1.0, 0.5, 0.8)) == expected


def test_the_cuda_sweep_fills_every_gpu_timing_on_a_cpu_made_to_pass_for_cuda(tmp_path, monkeypatch):
    """The sweep's CUDA-only work, run on the CPU with the device's timers faked by a clock that counts FLOPs:
    GPU kernel times of every prefill and of the adaptive rows' decode, each prefill captured as one graph
    (stock, adaptive and ideal rows; the masked rows are not captured), compiled stock's decode (here stock
    generate with a static cache, uncompiled) measured after the first budget's rows and before the others', and
    every target ratio that these give. A graph capture that fails costs only that timing: the sweep goes on, the
    row keeps its other timings, and the failure is named at the end."""
    from torch.utils.flop_counter import FlopCounterMode

    from adaptive_kernels import measuring
    from adaptive_kernels import sweep as sweep_module
    from adaptive_kernels.sweep import SweepIncomplete, sweep, target_ratios

    def flops(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e6

    captures = []

    def graph_replay_ms(fn, median_ms, repeats):
        captures.append(None)
        if len(captures) == 3:  # stock's, L's at 1.0, then its ideal's
            raise RuntimeError("planted capture failure")
        return flops(fn) / 2

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sweep_module, "build_model", lambda device, dtype: (tiny_llava().to(dtype), "tiny", TINY_RANK))
    monkeypatch.setattr(sweep_module, "default_dtype", lambda device: torch.float32)
    monkeypatch.setattr(sweep_module, "device_name", lambda device: "faked CUDA device")
    monkeypatch.setattr(sweep_module, "copy_bandwidth", lambda device: 1e9)
    monkeypatch.setattr(sweep_module, "matmul_rate", lambda device, dtype: 1e12)
    monkeypatch.setattr(measuring, "_once_ms", lambda fn, device: flops(fn))
    monkeypatch.setattr(sweep_module, "kernel_ms", lambda fn: flops(fn) / 4)
    monkeypatch.setattr(sweep_module, "graph_replay_ms", graph_replay_ms)
    budgets = (1.0, 0.7)
    with pytest.raises(SweepIncomplete) as incomplete:
        sweep("cuda", variants=("L",), backends=("torch",), budgets=budgets, new_tokens=2, repeats=1, out_dir=tmp_path,
              progress=False)
    assert incomplete.value.failures == ["ideal L 1.0 prefill as a CUDA graph: RuntimeError: planted capture failure"]
    rows = incomplete.value.rows
    assert [(r.system, r.budget) for r in rows] == [("stock", 1.0), ("adaptive", 1.0), ("masked", 1.0), ("ideal", 1.0),
                                                    ("stock-static-compiled", 1.0), ("adaptive", 0.7), ("masked", 0.7),
                                                    ("ideal", 0.7)]
    assert len(captures) == 5 and {r.device for r in rows} == {"faked CUDA device"}

    def measured(value) -> bool:
        return math.isfinite(value) and value > 0

    for r in rows:
        assert measured(r.prefill_ms) == (r.system != "stock-static-compiled"), r
        assert measured(r.prefill_kernel_ms) == (r.system != "stock-static-compiled"), r
        assert measured(r.prefill_graph_ms) == (r.system in ("stock", "adaptive", "ideal")
                                                and (r.system, r.budget) != ("ideal", 1.0)), r
        assert measured(r.decode_kernel_ms) == (r.system == "adaptive"), r
        assert measured(r.decode_ms_per_token) == (r.system != "ideal"), r
        if r.system in ("stock", "adaptive", "ideal") and measured(r.prefill_graph_ms):
            assert r.prefill_graph_ms == pytest.approx(2 * r.prefill_kernel_ms)  # the clocks count the same prefill
    for ratios in target_ratios(rows):
        at_full = ratios["budget"] == 1.0
        for name, value in ratios.items():
            if name in ("variant", "backend", "budget"):
                continue
            assert measured(value) == (not (name == "prefill_graph_vs_ideal" and at_full)
                                       and (name != "decode_vs_compiled_stock" or at_full)), (name, ratios)
    written = sweep_module.read_records(tmp_path / "sweep-tiny-targets.json")
    assert len(written) == len(budgets) and math.isfinite(written[0]["decode_vs_compiled_stock"])


def test_median_timer_warms_up_once_then_gives_the_median_of_the_timed_calls(monkeypatch):
    """One untimed warm-up call, then ``repeats`` timed ones, each with garbage collection off (and on again after);
    the median of their times. A timed call reads in ms."""
    import gc
    import statistics
    import types

    from adaptive_kernels import measuring

    calls, clock = [], iter([3.0, 3.25])  # perf_counter before and after the call: 250 ms
    monkeypatch.setattr(measuring, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))  # this module's
    assert measuring._once_ms(lambda: calls.append(None), "cpu") == pytest.approx(250.0) and len(calls) == 1
    monkeypatch.undo()
    calls, times = [], [5.0, 1.0, 4.0, 2.0, 100.0]

    def once_ms(fn, device):
        assert device == "cpu" and not gc.isenabled()
        fn()
        return times[len(calls) - 2]  # calls[0] is the warm-up's

    monkeypatch.setattr(measuring, "_once_ms", once_ms)
    assert measuring.median_timer("cpu")(lambda: calls.append(None), len(times)) == statistics.median(times)
    assert len(calls) == len(times) + 1 and gc.isenabled()


def test_a_cuda_timed_call_starts_on_an_idle_device(monkeypatch):
    """The device is synchronised before the start event is recorded: queued behind earlier work (the warm-up's
    last kernels), the start would miss the host time the call spent meanwhile. The events are faked here."""
    from adaptive_kernels import measuring

    log = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            log.append("record")

        def elapsed_time(self, end):
            return 3.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: log.append("synchronize"))
    assert measuring._once_ms(lambda: log.append("call"), "cuda") == 3.0
    assert log == ["synchronize", "record", "call", "record", "synchronize"]


def test_kernel_ms_reads_the_profilers_microseconds_as_ms_and_nan_where_it_saw_no_kernel(monkeypatch):
    """kernel_ms sums the profiler's self_device_time_total, which is in microseconds, as ms: kernels of 1200, 300
    and 45 us read 1.545 ms (not 0.001545); a profile with no kernel time measured nothing and reads NaN, not 0 ms,
    which a ratio would take as infinitely fast. The profiler is faked: no GPU needed."""
    import types

    import torch.profiler

    from adaptive_kernels import measuring

    kernels, log = [], []

    class Profile:
        def __init__(self, activities):
            assert activities == [torch.profiler.ProfilerActivity.CUDA]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return [types.SimpleNamespace(self_device_time_total=us) for us in kernels]

    monkeypatch.setattr(torch.profiler, "profile", Profile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: log.append("synchronize"))
    kernels[:] = [1200.0, 300.0, 45.0]
    assert measuring.kernel_ms(lambda: log.append("call")) == pytest.approx(1.545, rel=1e-12)
    assert log == ["call", "synchronize"]  # the kernels done before the profile ends
    for no_kernel_time in ([], [0.0, 0.0]):
        kernels[:] = no_kernel_time
        assert math.isnan(measuring.kernel_ms(lambda: None)), no_kernel_time


def test_targets_table_marks_each_ratio_above_its_own_bound():
    """Each cell sits under its own ratio's header, its number ending where the header does, and is marked ``!`` when above that ratio's bound only: not at
    the bound, not below it, not when not measured (NaN)."""
    import re

    from adaptive_kernels.sweep import TARGETS, targets_table

    scale = [2.0, 1.0, 0.5, float("nan"), 1.5, 0.25, 3.0, 0.75]  # over, at, under, not measured, over, under...
    ratios = {name: bound * s for (name, (_, bound)), s in zip(TARGETS.items(), scale, strict=True)}
    header, line = targets_table([{"variant": "H", "backend": "torch", "budget": 0.5625, **ratios}]).splitlines()
    columns = list(re.finditer(r"(\S+) \(([\d.]+)\)", header))
    assert [c[1] for c in columns] == [label for label, _ in TARGETS.values()]
    name = {label: n for n, (label, _) in TARGETS.items()}
    cells = list(re.finditer(r"[^\s!]+!?", line))
    assert [c[0] for c in cells[:3]] == ["H", "torch", "0.5625"]  # the budget as given
    for column, match in zip(columns, cells[3:], strict=True):
        (label, bound), cell = column.groups(), match[0]
        value, marked = float(cell.rstrip("!")), cell.endswith("!")
        assert match.start() + len(cell.rstrip("!")) == column.end(), (header, line)  # the number ends under ")"
        want = ratios[name[label]]
        assert (math.isnan(value) and math.isnan(want)) or value == pytest.approx(want, abs=1e-3), (label, cell)
        assert marked == (want > float(bound)), (label, cell)


def test_report_prints_each_budget_as_given_in_its_rows_and_its_targets():
    """The sweep's report, its rows and its targets table, prints a budget as given (repr), as the main job does:
    with '{:g}' 0.9999999 printed as 1, which reads as the full model, and 0.1 + 0.2 as 0.3."""
    from adaptive_kernels.sweep import Row, report

    budgets = {1.0: (1.0, 20.0), 0.9999999: (0.9375, 19.0), 0.1 + 0.2: (0.5, 11.0)}  # budget: cost, prefill ms
    rows = [Row(system="adaptive", budget=b, cost=c, prefill_ms=p, **SWEEP_ROW) for b, (c, p) in budgets.items()]
    lines = report(rows).splitlines()
    for line, (b, (c, p)) in zip(lines[1:4], budgets.items(), strict=True):
        assert line.split()[:6] == ["adaptive", "L", "torch", repr(b), f"{c:.2f}", f"{p:.2f}"], line
    targets = [line.split()[:3] for line in lines if line.startswith("L torch ")]
    assert targets == [["L", "torch", "1.0"], ["L", "torch", "0.9999999"], ["L", "torch", "0.30000000000000004"]]


def test_prefill_is_compared_with_the_ideal_of_its_own_variant_and_budget():
    """prefill_vs_ideal divides by the ideal row of the same variant and budget; NaN where that variant has none."""
    from adaptive_kernels.sweep import Row, target_ratios

    prefill = {("L", 0.5): 4.0, ("H", 0.5): 6.0, ("L", 1.0): 8.0}
    ideal = {("L", 0.5): 2.0, ("H", 0.5): 3.0, ("H", 1.0): 5.0}  # none for L at 1.0
    rows = [Row(system="adaptive", budget=b, cost=b, prefill_ms=p, **{**SWEEP_ROW, "variant": v})
            for (v, b), p in prefill.items()]
    rows += [Row(system="ideal", budget=b, cost=b, prefill_ms=p, **{**SWEEP_ROW, "variant": v, "backend": "transformers"})
             for (v, b), p in ideal.items()]
    found = {(t["variant"], t["budget"]): t["prefill_vs_ideal"] for t in target_ratios(rows)}
    assert found.keys() == prefill.keys()
    for key, p in prefill.items():
        if key in ideal:
            assert found[key] == pytest.approx(p / ideal[key])
        else:
            assert math.isnan(found[key]), key


def test_prefill_is_compared_with_the_ideal_not_the_masked_row_of_its_budget():
    """The masked computation has the same variant, budget and cost as the ideal; prefill_vs_ideal (wall, kernels,
    graph) divides by the ideal row's whatever order the rows come in (sorted by system, say, masked after ideal)."""
    from adaptive_kernels.sweep import Row, target_ratios

    timings = RandomTimings(99)
    ref = {**SWEEP_ROW, "backend": "transformers"}
    budgets = {1.0: 1.0, 0.7: 0.6875}
    adaptive = {b: Row(system="adaptive", budget=b, cost=c, **timings.prefill(), **SWEEP_ROW)
                for b, c in budgets.items()}
    ideal = {b: Row(system="ideal", budget=b, cost=c, **timings.prefill(), **ref) for b, c in budgets.items()}
    masked = {b: Row(system="masked", budget=b, cost=c, **timings.prefill(), **ref) for b, c in budgets.items()}
    stock = Row(system="stock", budget=1.0, cost=1.0, **timings.prefill(), **{**ref, "variant": "L"})
    for rows in ([*adaptive.values(), *ideal.values(), *masked.values(), stock],
                 [stock, *masked.values(), *ideal.values(), *adaptive.values()]):
        found = {t["budget"]: t for t in target_ratios(rows)}
        assert found.keys() == budgets.keys()
        for b, t in found.items():
            for name, field in (("prefill_vs_ideal", "prefill_ms"), ("prefill_kernel_vs_ideal", "prefill_kernel_ms"),
                                ("prefill_graph_vs_ideal", "prefill_graph_ms")):
                want = getattr(adaptive[b], field) / getattr(ideal[b], field)
                assert t[name] == pytest.approx(want, rel=1e-12), (b, name)


def test_adherence_needs_the_latency_at_budget_one():
    """Without budget 1.0 there is no latency to take shares of: no adherence rows (and no error while the sweep
    writes its records)."""
    from adaptive_kernels.sweep import Row, budget_adherence

    rows = [Row(system="adaptive", budget=b, cost=b, prefill_ms=p, **SWEEP_ROW) for b, p in ((0.8, 8.0), (0.5, 5.0))]
    assert budget_adherence(rows) == []
    (alone,) = budget_adherence([Row(system="adaptive", budget=1.0, cost=1.0, prefill_ms=9.0, **SWEEP_ROW)])
    assert math.isnan(alone["largest_excess"]) and alone["at_budget"] is None  # 1.0 alone: no budget to judge


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_example_inputs_hold_one_image_token_per_image_feature(strategy):
    """Under either feature selection (CLIP's class token dropped by "default", kept by "full") each prompt holds as
    many image tokens as the model makes features of its image, and the model runs on it."""
    model = tiny_llava()
    model.config.vision_feature_select_strategy = strategy
    inputs = example_inputs(model, batch_size=2)
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert len(features[0]) == 16 + (strategy == "full")  # 4x4 patches of 7 px in 28 px, and the class token
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [len(f) for f in features]
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_example_inputs_refuse_a_vision_tower_they_cannot_count_the_image_tokens_of():
    model = tiny_llava()
    del model.model.vision_tower.embeddings.num_positions  # as a tower with no position table would be
    with pytest.raises(ValueError, match="^model: cannot count the image tokens"):
        example_inputs(model)


@pytest.mark.parametrize("image_token_id", [0, 1, 200, 511])
def test_example_inputs_draw_text_ids_from_the_whole_vocabulary_but_the_image_tokens(image_token_id):
    """Text ids are drawn from the whole of [1, vocab_size) but the image token's id, wherever that lies (at 1 the
    draw failed; past 1 it was drawn below the image token only; at 0, 1 was never drawn); the top text id too:
    20,480 draws of about 510 ids leave any one out with odds near e^-40."""
    model = tiny_llava()
    model.config.image_token_id = image_token_id
    ids = example_inputs(model, batch_size=1024, text_tokens=20)["input_ids"]
    text = ids[ids != image_token_id]
    assert (ids == image_token_id).sum() == 1024 * 16 and text.numel() == 1024 * 20
    drawn, allowed = set(text.tolist()), set(range(1, 512)) - {image_token_id}
    assert drawn == allowed and max(drawn) == (510 if image_token_id == 511 else 511)
    assert image_token_id != 200 or {199, 201} <= drawn  # either side of the image token's id


def test_example_inputs_left_pad_a_row_by_the_positions_given():
    """``pad=[.., n, ..]``: the row's first n positions are padding (id 0, mask 0), then the unpadded prompt's first
    tokens (its last n dropped, so the image tokens stay whole); rows not padded and the image are unchanged."""
    model = tiny_llava()
    pads = [0, 3, 1]
    plain = example_inputs(model, batch_size=3, seed=5)
    padded = example_inputs(model, batch_size=3, seed=5, pad=pads)
    S = plain["input_ids"].shape[1]
    for row, n in enumerate(pads):
        assert padded["attention_mask"][row].tolist() == [0] * n + [1] * (S - n)
        assert padded["input_ids"][row, :n].tolist() == [0] * n
        assert torch.equal(padded["input_ids"][row, n:], plain["input_ids"][row, :S - n])
    assert torch.equal(padded["pixel_values"], plain["pixel_values"])


def test_example_inputs_pad_a_row_by_up_to_text_tokens_less_two_keeping_the_image_whole():
    """The bound on ``pad`` is inclusive: a row padded by ``text_tokens - 2`` drops all the text after the image,
    its two leading text tokens and every image token kept; odd sizes."""
    model = tiny_llava(num_layers=2)
    for text_tokens in (2, 3, 7):
        n = text_tokens - 2
        plain = example_inputs(model, batch_size=2, text_tokens=text_tokens, seed=text_tokens)
        padded = example_inputs(model, batch_size=2, text_tokens=text_tokens, seed=text_tokens, pad=[n, 0])
        S = plain["input_ids"].shape[1]
        assert padded["attention_mask"][0].tolist() == [0] * n + [1] * (S - n)
        assert padded["input_ids"][0].tolist() == [0] * n + plain["input_ids"][0, :S - n].tolist()
        assert int((padded["input_ids"][0] == model.config.image_token_id).sum()) == image_token_count(model)
        assert torch.equal(padded["input_ids"][1], plain["input_ids"][1])


@pytest.mark.parametrize("sizes", [dict(batch_size=0), dict(batch_size=-1), dict(batch_size=1.5),
                                   dict(text_tokens=-1), dict(text_tokens=2.0)])
def test_example_inputs_refuse_sizes_that_are_not_counts_naming_them(sizes):
    """A batch of no rows or of a negative or fractional count, and a negative or fractional text length, are
    refused naming the argument, as tiny_llava refuses its sizes (a batch of 0 rows was returned, -1 rows was
    blamed on ``pad``, the others failed inside torch.randint)."""
    (name, value), = sizes.items()
    with pytest.raises(ValueError, match=f"^{name} must be a (positive|non-negative) integer, got {value}$"):
        example_inputs(tiny_llava(num_layers=2), **sizes)


@pytest.mark.parametrize("pad", [[11], [-1], [0.5], [0, 0]])
def test_example_inputs_refuse_padding_that_would_cut_the_image_or_name_no_row(pad):
    """A row padded by n drops its last n tokens: past the text after the image (10 of the 12 here) the image
    tokens were cut, and the model failed on features and tokens that do not match, naming nothing given."""
    refused = r"pad: at most one count per row \(1\), each an int in \[0, text_tokens - 2 = 10\]"
    with pytest.raises(ValueError, match=refused):
        example_inputs(tiny_llava(num_layers=2), batch_size=1, text_tokens=12, pad=pad)


DIVIDE = "tiny_llava_config: num_heads must divide hidden_size and num_kv_heads"


@pytest.mark.parametrize("sizes, refused", [
    (dict(num_heads=2), DIVIDE), (dict(num_kv_heads=3), DIVIDE), (dict(hidden_size=60), DIVIDE),
    (dict(num_heads=0), "num_heads must be a positive integer, got 0"),
    (dict(num_kv_heads=0), "num_kv_heads must be a positive integer, got 0"),
    (dict(num_layers=-1), "num_layers must be a positive integer, got -1"),
    (dict(vocab_size=511), "vocab_size must exceed the image token's id 511, got 511"),
])
def test_tiny_llava_refuses_sizes_a_llama_decoder_cannot_run(sizes, refused):
    """Heads that do not divide the hidden size, or key/value heads that do not divide the heads (the default 4 of
    them under 2 heads, say), built a model whose first forward failed in broadcasting, naming no size; no heads
    failed in a ZeroDivisionError, and a vocabulary without the image token's id built a model that its own
    example inputs failed in an IndexError."""
    with pytest.raises(ValueError, match=re.escape(refused)):
        tiny_llava(**sizes)


def test_tiny_llava_draws_every_decoder_norm_weight_and_leaves_the_global_generator_alone():
    """Every RMSNorm weight of the decoder, the final norm's too, is drawn in [0.5, 1.5] (not transformers' ones),
    the same for the same seed; and building the model neither reads nor reseeds the caller's generator."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model = tiny_llava(seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    norms = {n: w for n, w in model.model.language_model.named_parameters() if n.endswith("norm.weight")}
    assert len(norms) == 2 * model.config.text_config.num_hidden_layers + 1 and "norm.weight" in norms
    for name, weight in norms.items():
        assert not torch.all(weight == 1) and 0.5 <= weight.min() and weight.max() <= 1.5, name
    assert all(torch.equal(w, dict(tiny_llava(seed=4).model.language_model.named_parameters())[n])
               for n, w in norms.items())


def test_load_builds_the_tiny_model_and_inputs_from_the_seed_in_the_dtype_given():
    from adaptive_kernels.cli import load

    args = build_parser().parse_args(["--device", "cpu", "--dtype", "bfloat16", "--seed", "3"])
    model, inputs, name, rank = load(args)
    want = tiny_llava(seed=3).to(torch.bfloat16)
    assert model.dtype == torch.bfloat16 and rank == TINY_RANK and "seed=3" in name
    assert model.state_dict().keys() == want.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))
    assert not torch.equal(want.lm_head.weight, tiny_llava().to(torch.bfloat16).lm_head.weight)  # the seed matters
    expected = example_inputs(want, batch_size=1, seed=3)
    assert inputs.keys() == expected.keys() and all(torch.equal(inputs[k], expected[k]) for k in expected)
    assert not torch.equal(expected["input_ids"], example_inputs(want)["input_ids"])


@pytest.mark.parametrize("threads_given, threads", [(["--threads", "2"], 2), ([], 1)])
def test_repeats_threads_and_budgets_given_reach_the_timing_and_the_csv(threads_given, threads, tmp_path, monkeypatch):
    """--repeats sets the timed generate calls of each point, --threads torch's CPU threads while they run (restored
    after; without it one thread, for the built-in model on the CPU), a repeated budget runs once; the CSV records
    what ran."""
    from adaptive_kernels import cli as cli_module

    timed, real_timer = [], cli_module.median_timer

    def median_timer(device):
        median_ms = real_timer(device)

        def spy(fn, repeats):
            timed.append((repeats, torch.get_num_threads()))
            return median_ms(fn, repeats)
        return spy

    monkeypatch.setattr(cli_module, "median_timer", median_timer)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        rows, printed = run_main(["--variants", "L", "--budgets", "0.5", "0.5", "--out", str(tmp_path), *FAST,
                                  "--repeats", "2", *threads_given])
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert timed == [(2, threads)]
    assert [(r["budget"], r["repeats"], r["max_new_tokens"]) for r in rows] == [("0.5", "2", str(NEW_TOKENS))]
    assert f"cpu threads {threads} |" in printed


@pytest.mark.parametrize("bad, named, error", [
    ({"repeats": 0}, "repeats", ValueError),
    ({"new_tokens": 0}, "new_tokens", ValueError),
    ({"new_tokens": 2.0}, "new_tokens", ArgumentTypeError),
    ({"variants": ("X",)}, "variants", ValueError),
    ({"variants": ()}, "variants", ValueError),
    ({"variants": "L"}, "variants", ArgumentTypeError),
    ({"backends": ("torch", "X")}, "backends", ValueError),
    ({"budgets": (1.0, 1.5)}, "budgets", ValueError),
    ({"budgets": ()}, "budgets", ValueError),
    ({"budgets": 0.5}, "budgets", ArgumentTypeError),
    ({"device": "tpu"}, "device", ValueError),
    ({"device": 0}, "device", ArgumentTypeError),
    pytest.param({"device": "cuda"}, "device", ValueError,
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="refused where torch sees no CUDA device")),
    ({"backends": ("torch", "cuda")}, "backends", ValueError),
    ({"threads": 0}, "threads", ValueError),
    ({"threads": "2"}, "threads", ArgumentTypeError),
    ({"variants": ("L", "L")}, "variants", ValueError),
    ({"budgets": (0.5, 1.0, 0.5)}, "budgets", ValueError),
    ({"out_dir": None}, "out_dir", ArgumentTypeError),
    ({"out_dir": ""}, "out_dir", ValueError),  # Path("") is the current folder: the results would land there
])
def test_sweep_refuses_bad_arguments_before_building_the_model(bad, named, error, tmp_path, monkeypatch):
    from adaptive_kernels import sweep as sweep_module

    def build_model(device, dtype):
        raise AssertionError("the model was built")

    monkeypatch.setattr(sweep_module, "build_model", build_model)
    good = dict(device="cpu", variants=("L",), budgets=(1.0,), new_tokens=1, repeats=1, out_dir=tmp_path,
                progress=False)
    with pytest.raises(error, match=rf"^{named}[ =:]"):
        sweep_module.sweep(**(good | bad))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_sweep_refuses_an_out_dir_that_cannot_be_a_folder_before_building_the_model(where, tmp_path, monkeypatch):
    from adaptive_kernels import sweep as sweep_module

    def build_model(device, dtype):
        raise AssertionError("the model was built")

    monkeypatch.setattr(sweep_module, "build_model", build_model)
    file = tmp_path / "results"
    file.write_text("kept")
    out_dir = file if where == "a file" else file / "more"
    with pytest.raises(ValueError, match=rf"^out_dir: .*{out_dir.name}"):
        sweep_module.sweep(device="cpu", variants=("L",), budgets=(1.0,), new_tokens=1, repeats=1, out_dir=out_dir,
                           progress=False)
    assert file.read_text() == "kept"


@pytest.mark.parametrize("file", ["sweep-tiny.csv", "sweep-tiny.json", "sweep-tiny-adherence.json",
                                  "sweep-tiny-targets.json", "sweep-tiny.png"])
def test_sweep_refuses_a_folder_where_it_writes_a_file_before_building_the_model(file, tmp_path, monkeypatch,
                                                                                  capsys):
    """The records (rows as CSV and JSON, adherence, target ratios) would fail after the first row was timed, the
    plot after the whole sweep: each is refused up front, by the function and by the subcommand, naming the
    folder in the way."""
    from adaptive_kernels import sweep as sweep_module

    def build_model(device, dtype):
        raise AssertionError("the model was built")

    monkeypatch.setattr(sweep_module, "build_model", build_model)
    (tmp_path / file).mkdir()
    with pytest.raises(ValueError, match=rf"^out_dir: {tmp_path / file} is a folder, where the job writes a file"):
        sweep_module.sweep(device="cpu", variants=("L",), budgets=(1.0,), new_tokens=1, repeats=1, out_dir=tmp_path,
                           progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--device", "cpu", "--variants", "L", "--budgets", "1.0", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert f"argument --out: {tmp_path / file} is a folder" in err, err
    assert sorted(tmp_path.iterdir()) == [tmp_path / file]


@pytest.mark.parametrize("case", ["empty", "a cuda file's name"])
def test_sweep_subcommand_refuses_an_out_its_own_files_cannot_be_written_in_before_sweeping(case, tmp_path,
                                                                                          monkeypatch, capsys):
    """`adaptive-kernels sweep --out ""` (Path("") is the current folder, where the results landed) and, on CUDA
    (faked here), an --out holding a folder named as a file the CUDA sweep writes (the 7B-shaped model's names, not
    the tiny one's the CPU's checks use) exit 2 naming --out, as the main job does, before the sweep starts (replaced
    here by one that fails)."""
    from adaptive_kernels import sweep as sweep_module

    def started(*args, **kwargs):
        raise AssertionError("the sweep started")

    monkeypatch.setattr(sweep_module, "_sweep", started)
    monkeypatch.chdir(tmp_path)  # where an empty --out would write
    if case == "empty":
        argv, says, kept = ["--device", "cpu", "--out", ""], "argument --out: must name a folder, got an empty path", []
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        (tmp_path / "sweep-llava-1.5-7b-shaped.csv").mkdir()
        argv, kept = ["--device", "cuda", "--out", str(tmp_path)], [tmp_path / "sweep-llava-1.5-7b-shaped.csv"]
        says = f"argument --out: {kept[0]} is a folder, where the job writes a file"
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert says in err, err
    assert sorted(tmp_path.iterdir()) == kept


@pytest.fixture
def faked_sweep(monkeypatch):
    """``sweep``'s checks and set-up run, its measuring (``_sweep``) is faked: it records torch's CPU threads."""
    from adaptive_kernels import sweep as sweep_module

    seen = []

    def fake_sweep(device, variants, backends, budgets, new_tokens, repeats, out_dir, progress):
        seen.append(torch.get_num_threads())
        return []

    def build_model(device, dtype):
        raise AssertionError("the model was built")

    monkeypatch.setattr(sweep_module, "_sweep", fake_sweep)
    monkeypatch.setattr(sweep_module, "build_model", build_model)
    return sweep_module.sweep, seen


def test_sweep_on_cuda_leaves_torchs_threads_unless_told(faked_sweep, tmp_path, monkeypatch):
    """``threads`` None: 1 on the CPU, torch's default (the threads as they are) on CUDA; a number given is used on
    either; restored after each. CUDA is faked: only the thread setting is looked at."""
    sweep, seen = faked_sweep
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for device, threads in (("cuda", None), ("cuda", 2), ("cpu", None), ("cpu", 2)):
            sweep(device, variants=("L",), budgets=(1.0,), out_dir=tmp_path / device, progress=False, threads=threads)
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert seen == [3, 2, 1, 2]


def test_sweep_refuses_budgets_that_read_as_the_same_value(faked_sweep, tmp_path):
    """Budgets must be distinct as the sweep reads them: a numpy float32 0.7 is read as 0.7 (``resolve_budgets``), so
    beside a Python 0.7 it is the same budget, and would measure and write every row of that budget twice."""
    sweep, seen = faked_sweep
    with pytest.raises(ValueError, match=r"^budgets must be distinct"):
        sweep("cpu", variants=("L",), budgets=(0.7, np.float32(0.7)), out_dir=tmp_path, progress=False)
    assert seen == [] and not any(tmp_path.iterdir())
    sweep("cpu", variants=("L",), budgets=(np.float32(0.7), 0.5), out_dir=tmp_path, progress=False)  # distinct: runs
    assert len(seen) == 1


def test_sweep_makes_an_out_dir_whose_parents_do_not_exist(faked_sweep, tmp_path):
    """out_dir is made with every missing parent, as the default benchmarks/results is in a fresh checkout."""
    sweep, seen = faked_sweep
    out = tmp_path / "fresh" / "benchmarks" / "results"
    sweep("cpu", variants=("L",), budgets=(1.0,), out_dir=out, progress=False)
    assert out.is_dir() and seen == [1]


def test_sweep_records_and_plot_refuse_no_rows(tmp_path):
    from adaptive_kernels.sweep import plot_rows, write_records

    with pytest.raises(ValueError, match="^rows is empty"):
        write_records([], tmp_path, "sweep")
    with pytest.raises(ValueError, match="^rows is empty"):
        plot_rows([], tmp_path / "sweep.png")
    assert not any(tmp_path.iterdir())


def test_sweep_subcommand_passes_its_options_to_the_sweep(tmp_path, monkeypatch, capsys):
    """The options, repeats dropped, reach the sweep; --threads sets torch's CPU threads while it runs (1 on the
    cpu by default), restored after; without budget 1.0 a note says what is missing."""
    from adaptive_kernels import sweep as sweep_module

    seen = []

    def fake_sweep(device, variants, backends, budgets, new_tokens, repeats, out_dir, progress):
        seen.append(((device, variants, backends, budgets, new_tokens, repeats, Path(out_dir)),
                     torch.get_num_threads()))
        return []

    monkeypatch.setattr(sweep_module, "_sweep", fake_sweep)
    out = tmp_path / "out"
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for threads in ([], ["--threads", "2"]):
            assert main(["sweep", "--device", "cpu", "--variants", "L", "L", "--backends", "torch", "torch",
                         "--budgets", "0.5", "0.7", "0.5", "--new-tokens", "4", "--repeats", "2", "--out", str(out),
                         *threads]) == 0
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    options = ("cpu", ["L"], ["torch"], [0.5, 0.7], 4, 2, out)
    assert seen == [(options, 1), (options, 2)]
    assert "note: budget 1.0 is not among --budgets" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--device", "cpu", "--new-tokens", "0", "--out", str(out)])
    assert exit_info.value.code == 2 and "argument --new-tokens" in capsys.readouterr().err


def test_sweep_subcommand_defaults_are_the_sweep_functions(tmp_path, monkeypatch):
    """README gives `adaptive-kernels sweep` and `adaptive_kernels.sweep.sweep()` as one job: with no options
    they measure the same variants, budgets, tokens and repeats (the function repeated 5 times, the CLI 3)."""
    from adaptive_kernels import sweep as sweep_module

    seen = []
    def fake_sweep(device, variants, backends, budgets, new_tokens, repeats, out_dir, progress):
        seen.append((list(variants), backends, list(budgets), new_tokens, repeats))
        return []

    monkeypatch.setattr(sweep_module, "_sweep", fake_sweep)
    assert main(["sweep", "--device", "cpu", "--out", str(tmp_path)]) == 0
    sweep_module.sweep("cpu", out_dir=tmp_path)
    assert len(seen) == 2 and seen[0] == seen[1], seen
    assert seen[0][0] == ["L", "H"] and seen[0][-1] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where torch sees no CUDA device")
def test_cuda_without_a_cuda_device_is_refused_by_name(tmp_path, capsys):
    for argv in ([], ["sweep"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--device", "cuda", "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        assert "argument --device: cuda requested but torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_plots_draw_the_measured_latencies_and_the_ideal_at_full_latency_times_cost(tmp_path, monkeypatch):
    """The main job's plot and each panel of the sweep's: per variant (and backend) the measured latency over the
    budgets in order, and the ideal line, the latency at 1.0 times each plan's cost."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from adaptive_kernels import cli as cli_module
    from adaptive_kernels import sweep as sweep_module
    from adaptive_kernels.cli import write_plot
    from adaptive_kernels.sweep import Row, plot_rows

    figures = []

    class KeepFigures:  # pyplot, with the figures it closes kept to be read back
        def __getattr__(self, name):
            return getattr(plt, name)

        def close(self, fig):
            figures.append(fig)

    def lines(ax) -> dict:
        return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}

    for module in (cli_module, sweep_module):
        monkeypatch.setattr(module, "pyplot", lambda skipped: KeepFigures())
    series = [(0.6, 0.5, 6.0, 3.0), (1.0, 1.0, 10.0, 4.0), (0.8, 0.75, 9.0, 3.5)]  # budget, cost, prefill, decode
    ordered = sorted(series)
    budgets = [b for b, *_ in ordered]
    try:
        rows = [{"variant": "H", "budget": b, "cost": c, "latency_ms": p, "ideal_ms": 10.0 * c} for b, c, p, _ in series]
        assert write_plot(rows, tmp_path / "main.png", "title")
        (ax,) = figures[-1].axes
        assert lines(ax) == {"H measured": (budgets, [p for _, _, p, _ in ordered]),
                             "H ideal (latency at 1.0 x cost)": (budgets, [10.0 * c for _, c, _, _ in ordered])}
        sweep_rows = [Row(system="adaptive", budget=b, cost=c, prefill_ms=p, decode_ms_per_token=d,
                          **{**SWEEP_ROW, "variant": "H"}) for b, c, p, d in series]
        assert plot_rows(sweep_rows, tmp_path / "sweep.png") == tmp_path / "sweep.png"
        prefill, decode = figures[-1].axes
        for ax, column in ((prefill, 2), (decode, 3)):
            full = next(row[column] for row in series if row[0] == 1.0)
            assert lines(ax) == {"H torch": (budgets, [row[column] for row in ordered]),
                                 "H torch ideal (full x cost)": (budgets, [full * row[1] for row in ordered])}
    finally:
        for fig in figures:
            plt.close(fig)


@pytest.fixture
def drawn(monkeypatch):
    """``plot_rows`` with the figures it closes kept, to be read back; closed at the end."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from adaptive_kernels import sweep as sweep_module

    figures = []

    class KeepFigures:
        def __getattr__(self, name):
            return getattr(plt, name)

        def close(self, fig):
            figures.append(fig)

    monkeypatch.setattr(sweep_module, "pyplot", lambda skipped: KeepFigures())
    yield figures
    for fig in figures:
        plt.close(fig)


def cuda_rows():
    """Rows as a CUDA sweep writes them, fresh random timings: stock and the plans' rows with kernel times and graph
    replays, compiled stock with decode only, references at budgets given out of order (0.6, 1.0, 0.8)."""
    from adaptive_kernels.sweep import Row

    t = RandomTimings(4242)
    stock = {**SWEEP_ROW, "variant": "-", "backend": "transformers"}
    rows = [Row(system="stock", budget=1.0, cost=1.0, decode_ms_per_token=t.ms(), **t.prefill(), **stock),
            Row(system="stock-static-compiled", budget=1.0, cost=1.0, prefill_ms=float("nan"),
                decode_ms_per_token=t.ms(), **stock)]
    for b, c in {0.6: 0.5625, 1.0: 1.0, 0.8: 0.75}.items():
        rows.append(Row(system="adaptive", budget=b, cost=c, decode_ms_per_token=t.ms(), **t.prefill(), **SWEEP_ROW))
        rows.append(Row(system="masked", budget=b, cost=c, prefill_ms=t.ms(), prefill_kernel_ms=t.ms(),
                        decode_ms_per_token=t.ms(), **{**SWEEP_ROW, "backend": "transformers"}))
        rows.append(Row(system="ideal", budget=b, cost=c, **t.prefill(), **{**SWEEP_ROW, "backend": "transformers"}))
    return rows


def test_cuda_rows_get_a_panel_per_measured_phase(drawn, tmp_path):
    """Where kernel times and graph replays were taken (some rows, not compiled stock's), each has its panel
    beside prefill's and decode's wall time; each panel's measured line is its own field's."""
    from adaptive_kernels.sweep import plot_rows

    rows = cuda_rows()
    plot_rows(rows, tmp_path / "sweep.png")
    axes = drawn[-1].axes
    fields = ["prefill_ms", "prefill_graph_ms", "prefill_kernel_ms", "decode_ms_per_token"]
    assert [ax.get_title().splitlines()[0] for ax in axes] == [
        "prefill, wall", "prefill, one CUDA graph replayed", "prefill, GPU kernel time",
        "decode / token (steady state), wall"]
    adaptive = sorted((r for r in rows if r.system == "adaptive"), key=lambda r: r.budget)
    for ax, field in zip(axes, fields, strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines["L torch"].get_ydata()) == [getattr(r, field) for r in adaptive], field


def test_reference_lines_run_over_the_budgets_in_order(drawn, tmp_path):
    """The ideal and masked references are drawn as lines over the budgets in increasing order whatever order the
    rows came in (--budgets 0.6 1.0 0.8), each point its row's value; a reference not measured in a phase (the
    masked computation has no graph replay) draws no line there."""
    from adaptive_kernels.sweep import plot_rows

    rows = cuda_rows()
    plot_rows(rows, tmp_path / "sweep.png")
    what = {"ideal": "L: stock model cut to the plan", "masked": "L: masked computation (no skipping)"}
    fields = ["prefill_ms", "prefill_graph_ms", "prefill_kernel_ms", "decode_ms_per_token"]
    for ax, field in zip(drawn[-1].axes, fields, strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        for system, label in what.items():
            points = sorted((r for r in rows if r.system == system and not math.isnan(getattr(r, field))),
                            key=lambda r: r.budget)
            if not points:
                assert label not in lines, (field, system)
                continue
            assert list(lines[label].get_xdata()) == [r.budget for r in points], (field, system)
            assert list(lines[label].get_ydata()) == [getattr(r, field) for r in points], (field, system)


def test_the_gpu_sweep_model_has_llava_1_5_7b_shapes_in_bfloat16():
    """DESIGN's speed setting, checked without a GPU: the CUDA sweep's model has LLaVA-1.5-7B's shapes (hidden 4096,
    32 layers of 32 heads of 128 with as many key/value heads, MLP 11008, 576 image tokens per image) and is timed in
    bfloat16 (float32 on the CPU); built on the meta device, so nothing is allocated."""
    from transformers import LlavaForConditionalGeneration

    from adaptive_kernels.measuring import default_dtype
    from adaptive_kernels.sweep import llava_7b_config, model_name

    config = llava_7b_config()
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (4096, 32, 32, 32, 11008, 32064)
    assert text.hidden_size // text.num_attention_heads == 128
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    assert image_token_count(model) == config.image_seq_length == 576
    assert default_dtype("cuda") == torch.bfloat16 and default_dtype("cpu") == torch.float32
    assert model_name("cuda") == "llava-1.5-7b-shaped" and model_name("cpu") == "tiny"


def test_matmul_rate_counts_two_flops_per_multiply_add_at_the_median_time(monkeypatch):
    """matmul_rate is 2 n^3 FLOPs (one multiply and one add per term) over the median of the timed square products,
    n = 512 on the CPU: the prefill floors and flop shares divide by it."""
    from adaptive_kernels import measuring

    products, times = [], [9.0, 0.5, 2.0, 2.0, 30.0] * 4  # median 2 ms, minimum 0.5 ms

    def once_ms(fn, device):
        assert device == "cpu"
        products.append(fn())
        return times[len(products) - 1]

    monkeypatch.setattr(measuring, "_once_ms", once_ms)
    rate = measuring.matmul_rate("cpu", torch.float32)
    assert len(products) == len(times)
    (n, m) = products[0].shape
    assert n == m == 512 and products[0].dtype == torch.float32
    assert rate == pytest.approx(2 * n ** 3 / 2e-3, rel=1e-12)
    products.clear()
    times[:] = [t / 2 for t in times]  # measured again at each call (a sweep's own threads), not kept
    assert measuring.matmul_rate("cpu", torch.float32) == pytest.approx(2 * rate, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_matmul_rate_times_products_in_the_dtype_given(dtype, monkeypatch):
    """matmul_rate(device, dtype) times square products in ``dtype`` (bf16 on CUDA runs at another rate than fp32):
    every timed product is n x n in that dtype."""
    from adaptive_kernels import measuring

    products = []

    def once_ms(fn, device):
        products.append(fn())
        return 1.0

    monkeypatch.setattr(measuring, "_once_ms", once_ms)
    rate = measuring.matmul_rate("cpu", dtype)
    assert products and all(p.dtype == dtype and p.shape == (512, 512) for p in products)
    assert rate == pytest.approx(2 * 512 ** 3 / 1e-3, rel=1e-12)


def test_cpu_threads_are_restored_after_an_error_inside():
    """cpu_threads sets torch's CPU threads within the block and restores them after, also where the block raises
    (a failed sweep must not leave the caller's process on one thread)."""
    from adaptive_kernels.measuring import cpu_threads

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with pytest.raises(RuntimeError, match="inside"), cpu_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 3
        with cpu_threads(None):  # None: left as they are
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_run_stamp_says_not_installed_for_a_missing_triton(monkeypatch):
    """A machine without triton records "not installed" as its version (run_stamp's and package_version's docstrings),
    not an empty cell that reads as a lost value; the other versions are still read."""
    from adaptive_kernels.measuring import run_stamp

    real_version = importlib.metadata.version

    def version(name):
        if name == "triton":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    stamp = run_stamp()
    assert stamp["triton"] == "not installed"
    assert stamp["transformers"] == real_version("transformers") and stamp["torch"] == torch.__version__


def test_prefill_floor_is_row_0s_of_a_plan_with_rows_that_differ():
    """prefill_floor_ms reads row 0 of the plan, whatever the other rows run: a 2-row plan whose row 1 runs every
    layer, head and group has the floor of its row 0 alone (whose own floor test_cli counts by hand), below the full
    model's. Random masks."""
    from adaptive_kernels.sweep import prefill_floor_ms

    model = tiny_llava(seed=2)
    text = model.config.text_config
    L, H = text.num_hidden_layers, text.num_attention_heads
    gen = torch.Generator().manual_seed(17)
    layers = torch.rand(1, L, generator=gen) < 0.6
    heads = (torch.rand(1, L, H, generator=gen) < 0.5) & layers[..., None]
    groups = (torch.rand(1, L, H, generator=gen) < 0.5) & layers[..., None]
    row0 = ak.ExecutionPlan(layers, heads, groups)
    full = ak.ExecutionPlan.full(1, L, H)
    both = ak.ExecutionPlan(torch.cat([layers, full.layers]), torch.cat([heads, full.heads]),
                            torch.cat([groups, full.groups]))
    T, rate = 23, 2.5e11
    alone = prefill_floor_ms(model, row0, T, rate)
    assert prefill_floor_ms(model, both, T, rate) == pytest.approx(alone, rel=1e-12)
    assert alone < prefill_floor_ms(model, full, T, rate)


def test_run_stamp_records_the_installed_versions_and_the_utc_date_to_the_second():
    """Every result row's stamp: torch's, transformers' and Triton's own installed versions (not one another's; "not
    installed" for a missing triton), and the date as ISO 8601 in UTC (offset 0, whole seconds), taken when the stamp
    is made; the op benchmarks name their files from it with a ``Z``."""
    import datetime
    import importlib.metadata
    import importlib.util

    from adaptive_kernels.measuring import run_stamp

    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    stamp = run_stamp()
    after = datetime.datetime.now(datetime.timezone.utc)
    assert stamp.keys() == {"torch", "transformers", "triton", "date"}
    assert stamp["torch"] == torch.__version__
    assert stamp["transformers"] == importlib.metadata.version("transformers")
    has_triton = importlib.util.find_spec("triton") is not None
    assert stamp["triton"] == (importlib.metadata.version("triton") if has_triton else "not installed")
    date = datetime.datetime.fromisoformat(stamp["date"])
    assert date.utcoffset() == datetime.timedelta(0) and date.microsecond == 0, stamp["date"]
    assert before <= date <= after


def test_every_phase_is_held_to_its_own_measure_in_ratios_adherence_and_report():
    """As on CUDA, where every phase is measured: each target ratio divides like by like (prefill wall time, GPU
    kernel time and graph replay by the ideal's same measure of the same variant and budget, decode per token by its
    own floor and by its active weights' floor, scheduling by prefill's wall and kernel time); adherence has a record
    per measured phase, GPU kernel times and graph replays included, each the largest t(b) / t(1.0) - cost(b) below
    1.0; the report's kernels/floor column is prefill's GPU kernel time over its FLOP floor. Fresh random timings."""
    from adaptive_kernels.sweep import Row, budget_adherence, report, target_ratios

    gen = torch.Generator().manual_seed(8111)

    def ms() -> float:
        return 1.0 + 9.0 * float(torch.rand((), generator=gen))

    phases = ("prefill_ms", "prefill_kernel_ms", "prefill_graph_ms", "decode_ms_per_token", "decode_kernel_ms")
    costs = {1.0: 1.0, 0.7: 0.6875, 0.5: 0.53125}
    adaptive = {b: Row(system="adaptive", budget=b, cost=c, schedule_ms=ms() / 50, decode_floor_ms=ms(),
                       decode_weight_floor_ms=ms(), prefill_floor_ms=ms(), **{p: ms() for p in phases}, **SWEEP_ROW)
                for b, c in costs.items()}
    ideal = {b: Row(system="ideal", budget=b, cost=c, prefill_ms=ms(), prefill_kernel_ms=ms(), prefill_graph_ms=ms(),
                    **{**SWEEP_ROW, "backend": "transformers"}) for b, c in costs.items()}
    rows = [*adaptive.values(), *ideal.values()]

    ratios = {t["budget"]: t for t in target_ratios(rows)}
    assert ratios.keys() == costs.keys()
    for b, t in ratios.items():
        a, i = adaptive[b], ideal[b]
        want = {"prefill_vs_ideal": a.prefill_ms / i.prefill_ms,
                "prefill_kernel_vs_ideal": a.prefill_kernel_ms / i.prefill_kernel_ms,
                "prefill_graph_vs_ideal": a.prefill_graph_ms / i.prefill_graph_ms,
                "decode_vs_floor": a.decode_ms_per_token / a.decode_floor_ms,
                "decode_vs_weight_floor": a.decode_ms_per_token / a.decode_weight_floor_ms,
                "schedule_share_of_prefill": a.schedule_ms / a.prefill_ms,
                "schedule_share_of_prefill_kernels": a.schedule_ms / a.prefill_kernel_ms}
        for name, value in want.items():
            assert t[name] == pytest.approx(value, rel=1e-12), (b, name)

    found = {a["phase"]: (a["largest_excess"], a["at_budget"]) for a in budget_adherence(rows)}
    assert found.keys() == {"prefill", "prefill_kernel", "prefill_graph", "decode", "decode_kernel"}
    for phase in phases:
        excess = {b: getattr(r, phase) / getattr(adaptive[1.0], phase) - r.cost for b, r in adaptive.items() if b < 1}
        worst = max(excess, key=excess.get)
        name = phase.removesuffix("_ms_per_token").removesuffix("_ms")
        assert found[name] == (pytest.approx(excess[worst], rel=1e-12), worst), phase

    lines = report(rows).splitlines()
    for line, row in zip(lines[1:1 + len(rows)], rows, strict=True):
        cells = line.split()
        assert (cells[0], float(cells[3])) == (row.system, row.budget)
        kernels_over_floor = row.prefill_kernel_ms / row.prefill_floor_ms  # NaN for the ideal rows: no floor here
        assert float(cells[6]) == pytest.approx(kernels_over_floor, abs=0.006, nan_ok=True), line


def test_sweep_prefill_floors_are_each_plans_flops_over_the_tokens_it_runs(tmp_path, monkeypatch):
    """Each row's prefill_floor_ms is prefill_floor_ms of what that row runs, at the rate measured: stock the full
    model over the prompt, the adaptive and ideal rows their plan over the prompt and the latency token (n + 1);
    the masked computation, which skips nothing, has none. Timed by a constant clock (the floors need no timing)."""
    from adaptive_kernels import ExecutionPlan
    from adaptive_kernels import measuring
    from adaptive_kernels import sweep as sweep_module
    from adaptive_kernels.sweep import prefill_floor_ms, sweep

    built, rate = [], 3.7e11

    def build_model(device, dtype):
        built.append(tiny_llava(seed=13).to(dtype))
        return built[-1], "tiny", TINY_RANK

    monkeypatch.setattr(sweep_module, "build_model", build_model)
    monkeypatch.setattr(measuring, "_once_ms", lambda fn, device: (fn(), 1.0)[1])
    monkeypatch.setattr(sweep_module, "matmul_rate", lambda device, dtype: rate)
    budgets = (1.0, 0.7)
    rows = sweep("cpu", variants=("H",), budgets=budgets, new_tokens=1, repeats=1, out_dir=tmp_path, progress=False)
    (model,) = built
    inputs = example_inputs(model)
    embeds = prompt_embeddings(model, inputs)
    n, config = embeds.shape[1], model.config.text_config
    patched = ak.patch(copy.deepcopy(model), "H", rank=TINY_RANK)
    found = {(r.system, r.budget): r.prefill_floor_ms for r in rows}
    full = ExecutionPlan.full(1, config.num_hidden_layers, config.num_attention_heads)
    assert found["stock", 1.0] == pytest.approx(prefill_floor_ms(model, full, n, rate), rel=1e-12)
    for b in budgets:
        p = ak.plan(patched, latency_budget=b, inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
        want = prefill_floor_ms(model, p, n + 1, rate)
        assert found["adaptive", b] == pytest.approx(want, rel=1e-12), b
        assert found["ideal", b] == pytest.approx(want, rel=1e-12), b
        assert math.isnan(found["masked", b])
    assert found["adaptive", 0.7] < found["adaptive", 1.0]
