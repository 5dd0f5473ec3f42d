"""Greedy generation that queues each decode step before it learns whether the last one finished.

transformers' greedy loop (``GenerationMixin._sample``) reads on the host, after every token, whether
all rows have finished: the host waits for the GPU, then prepares the next step while the GPU idles.
At batch 1, with a decode step replayed as one CUDA graph, that idle time is a large share of each
token. Here the flag is copied to the host asynchronously and read one step late, so the host prepares
step t+1 while the GPU runs step t; when the late flag says every row had finished, the step queued
meanwhile is dropped. The returned ids equal transformers' loop's exactly.
"""

from __future__ import annotations

import torch

RUN_AHEAD_DEVICES = ("cuda",)  # where a queued step runs while the host goes on


class LateFinishFlag:
    """Per step, whether every row has finished, read on the host one step later: by then the device
    has computed it, so reading it does not wait for the step just queued."""

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self._slots = [(torch.zeros((), dtype=torch.bool, pin_memory=cuda), torch.cuda.Event() if cuda else None)
                       for _ in range(2)]
        self._steps = 0

    def push(self, unfinished: torch.Tensor) -> bool:
        """Note whether ``unfinished`` [B] (0: that row has finished) is all 0 at this step; return the
        note of the step before (False at the first step)."""
        flag, copied = self._slots[self._steps % 2]
        flag.copy_(unfinished.max() == 0, non_blocking=True)
        if copied is not None:
            copied.record(torch.cuda.current_stream(unfinished.device))
        self._steps += 1
        if self._steps == 1:
            return False
        flag, copied = self._slots[self._steps % 2]
        if copied is not None:
            copied.synchronize()
        return bool(flag)


def runs_ahead(model, input_ids: torch.Tensor, generation_config, synced_gpus: bool, streamer,
               model_kwargs: dict) -> bool:
    """Whether a ``_sample`` call can run ahead: greedy, on a device of ``RUN_AHEAD_DEVICES``, with a
    cache, and nothing that sees the queued step before it is dropped (returned scores or cache, a cache
    the caller keeps, a streamer, synchronised GPUs, an assistant, a compiled forward, a rotary embedding
    whose state a step changes)."""
    kept_cache = any(getattr(model_kwargs.get(name), "_is_user_defined", False)
                     for name in ("cache", "past_key_values"))
    return (input_ids.device.type in RUN_AHEAD_DEVICES and not generation_config.do_sample
            and not generation_config.return_dict_in_generate and model_kwargs.get("use_cache", True)
            and not kept_cache and streamer is None and not synced_gpus and not generation_config.is_assistant
            and not model._valid_auto_compile_criteria(model_kwargs, generation_config)
            and not rope_keeps_state(model.model.language_model.rotary_emb))


def rope_keeps_state(rotary) -> bool:
    """Whether a call of the ``rotary`` embedding changes what later calls get: dynamic NTK scaling grows its
    frequencies with the longest sequence it has seen, so a queued step that is then dropped would leave them
    grown for the next request."""
    rope_type = getattr(rotary, "rope_type", "default")
    return any("dynamic" in kind for kind in (rope_type.values() if isinstance(rope_type, dict) else [rope_type]))


def greedy_running_ahead(model, input_ids: torch.Tensor, logits_processor, stopping_criteria, generation_config,
                         **model_kwargs) -> torch.Tensor:
    """transformers' greedy decoding (``_sample`` with ``do_sample=False``) for a call ``runs_ahead``
    admits, queueing each step before reading whether the one before finished: input_ids [B, S] ->
    [B, S + new tokens], the same ids."""
    pad = generation_config._pad_token_tensor
    pad = None if pad is None else pad.to(input_ids.device)
    eos_stops = any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria)
    max_length = stopping_criteria.max_length
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    finished_before = LateFinishFlag(input_ids.device)
    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    while True:
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs,
                                                                 is_encoder_decoder=model.config.is_encoder_decoder)
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
        del outputs  # the prefill's logits can be large
        tokens = logits_processor(input_ids, logits).argmax(dim=-1)
        if eos_stops:
            tokens = tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, None)
        if finished_before.push(unfinished):
            return input_ids[:, :-1]  # every row had finished a step ago: this step was only queued ahead
        if max_length is not None and input_ids.shape[1] >= max_length:
            return input_ids
        inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
        outputs = model(**inputs, return_dict=True)
