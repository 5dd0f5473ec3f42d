"""The KV cache of a patched model: executed layers and executed key/value heads only.

One request's plan is fixed at prefill and kept here, so decode steps reuse it. Layer ``l``
holds keys and values for the batch rows that execute it, compact over their active key/value
heads: [rows of l, active kv heads (padded to the row maximum), capacity, head_dim]. Buffers are
allocated with room to grow (``CAPACITY_STEP`` positions at a time), so a decode step writes in
place, and a CUDA graph of it (``graphs.py``) keeps reading the same memory.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache

from .graphs import capturing
from .plan import DecoderShape

CAPACITY_STEP = 128


def _buffer(like: torch.Tensor, capacity: int) -> torch.Tensor:
    """Zeros [R, heads, capacity, d] for ``like``'s keys or values [R, heads, T, d], written in place by later calls:
    a normal tensor even under ``torch.inference_mode`` (an inference tensor could not be written outside it)."""
    with torch.inference_mode(False):
        return like.new_zeros(*like.shape[:2], capacity, like.shape[3])


class AdaptiveCache(Cache):
    """A transformers ``Cache`` that ``generate`` carries between steps.

    ``length`` counts every filled position, the latency token's included (so does ``get_seq_length()``, outside
    an ``input_id_view``); ``latency_index`` is that token's column (None when the request has none);
    ``position_shift`` [B] (None likewise), the token's position minus the prompt's last column's: what decode
    positions going on from that column lack (``positions_and_mask``).
    """

    is_compileable = False
    is_croppable = True  # crop() takes back rejected draft tokens (assisted decoding)

    def __init__(self, decoder_shape: DecoderShape, latency_index: int | None, schedule=None,
                 position_shift: torch.Tensor | None = None):
        super().__init__(layers=[])
        self.decoder_shape = decoder_shape  # of the decoder that fills it, and that alone continues it
        self.schedule = schedule  # set once the plan is known (after the prefix, with a budget)
        self.latency_index = latency_index
        self.position_shift = position_shift
        self.budgets: list[float] | None = None  # per row, those the plan was made from (None: a given plan, or none)
        self.agreed: dict = {}  # the request's own arguments, and later calls' found to match (check_continuation)
        self.keys: list[torch.Tensor | None] = [None] * decoder_shape.num_layers
        self.values: list[torch.Tensor | None] = [None] * decoder_shape.num_layers
        self.length = 0
        self.capacity = 0
        self.write_position: torch.Tensor | None = None  # set while a CUDA graph is captured
        self.decode_graph = None  # graphs.DecodeGraph of this request's decode step
        self.warm = False  # a one-token step has run eagerly (kernels compiled)
        self.counting_input_ids = False  # see input_id_view
        self._ak_replaced = False  # given to a prefill, which returned another cache: not to be continued
        self.replayed_call: torch.Tensor | None = None  # made in a caller's CUDA-graph capture: see record_captured
        self.last_call_captured = False  # whether the call that wrote it last ran in a capture, rather than eagerly
        self._captured: list = []  # per call captured: (length, capacity, keys, values) as it left them

    @property
    def plan(self):
        return self.schedule.plan

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: no linear-attention (recurrent) state; every layer is plain attention."""
        return [False] * len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Filled positions (those the call replayed last left, for a cache made in a capture: ``catch_up``); in an
        ``input_id_view``, those of the caller's tokens (the latency token's not)."""
        self.catch_up()
        has_latency_token = self.latency_index is not None and self.length > self.latency_index
        return self.length - (self.counting_input_ids and has_latency_token)

    @contextmanager
    def input_id_view(self):
        """Within the block ``get_seq_length()`` counts cached input ids: ``generate``, continuing this
        cache, slices the ids it is given by that count, and knows nothing of the latency token."""
        self.counting_input_ids = True
        try:
            yield self
        finally:
            self.counting_input_ids = False

    def crop(self, tokens_to_remove: int) -> None:
        """Forget cached positions: the last ``-tokens_to_remove`` of them (as ``generate`` calls it, with 0 or
        less), or, given a positive number, all but that many (transformers' older meaning, counted as
        ``get_seq_length`` counts). Buffers keep their memory; later steps overwrite what was forgotten.
        ``ValueError`` for a crop that would keep a budget request's prompt without its latency token (the plan
        was made from it); cropping every position is allowed (the next call starts a new request)."""
        self.catch_up()
        if tokens_to_remove <= 0:
            keep = max(self.length + tokens_to_remove, 0)
        else:
            keep = tokens_to_remove
            if self.counting_input_ids and self.latency_index is not None and keep >= self.latency_index:
                keep += 1  # the latency token follows the prompt's ids kept
            keep = min(self.length, keep)
        if self.latency_index is not None and 0 < keep <= self.latency_index:
            counted = "input ids" if self.counting_input_ids else "positions"  # the same below the token
            raise ValueError(f"crop: keeping {keep} of {self.get_seq_length()} cached {counted} would drop the latency "
                             f"token (position {self.latency_index}, after the prompt) that this request's plan was "
                             f"made from; keep at least {self.latency_index + 1 - self.counting_input_ids}, or crop "
                             "every position for a new request")
        self.length = keep

    def reset(self) -> None:
        """Forget every position and free the buffers: the next forward with this cache is a new prefill
        (a new request, which makes its own plan and cache), also when an earlier prefill was given it."""
        self.keys, self.values = [None] * len(self.keys), [None] * len(self.values)
        self.length = self.capacity = 0
        self.decode_graph, self.warm, self._ak_replaced = None, False, False
        self.replayed_call, self._captured, self.last_call_captured = None, [], False

    @property
    def batch_size(self) -> int:
        """Rows of the request (its plan's), or -1 before the plan is known."""
        return -1 if self.schedule is None else self.schedule.plan.batch_size

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """-1: no maximum, the buffers grow."""
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """(key positions a query of ``query_length`` new tokens attends over, offset 0)."""
        return self.length + query_length, 0

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        raise ValueError("has_previous_state asks about linear-attention layers; an AdaptiveCache holds attention only")

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Refused: a stock attention layer writing here (after ``unpatch``, say) would need stock layers."""
        raise ValueError("cache: an AdaptiveCache holds a patched model's executed layers and heads, filled by it "
                         "alone; a stock model (unpatched, say) cannot continue it: start a new request")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("AdaptiveCache cannot repeat rows: each row's plan and compact heads were fixed at "
                                  "prefill; give generate the repeated prompts (num_beams / num_return_sequences do this)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("AdaptiveCache cannot select rows: each row's plan and compact heads were fixed at "
                                  "prefill; run the rows you want as their own request")

    def record_captured(self, device: torch.device) -> None:
        """Called at the end of each call inside a caller's CUDA-graph capture that fills this cache: the state a
        replay of that call leaves, to which ``catch_up`` returns. Replays rewrite the cache, which Python does
        not see: each such call also numbers itself in a flag on ``device`` (made by the first), which its
        replays set and ``catch_up`` reads and clears, so that the call replayed last, in whichever graph, is the
        one continued."""
        self._captured.append((self.length, self.capacity, list(self.keys), list(self.values)))
        self.last_call_captured = True
        if self.replayed_call is None:
            with torch.inference_mode(False):  # written by later calls, which may run outside inference mode
                self.replayed_call = torch.empty(1, dtype=torch.long, device=device)
        self.replayed_call.fill_(len(self._captured))

    def catch_up(self) -> None:
        """Before an eager call or a count of positions, for a cache made in a capture: where a graph replayed since
        the last one, the cache goes back to the state the call replayed last left (its length, and the buffers it
        wrote, where the calls since moved the cache to others). Reads the flag back to the host (before a CUDA
        graph's first replay it holds what its memory held: a number of no call is taken as no replay); does
        nothing inside a capture, or for a cache made outside one."""
        if self.replayed_call is None or capturing(self.replayed_call):
            return
        call = int(self.replayed_call.item())
        if not 0 < call <= len(self._captured):
            return
        self.replayed_call.fill_(0)
        self.length, capacity, keys, values = self._captured[call - 1]
        if any(now is not then for now, then in zip(self.keys, keys)):  # a decode graph captured since read others
            self.decode_graph, self.warm = None, False
        self.capacity, self.keys, self.values = capacity, list(keys), list(values)

    def reserve(self, positions: int) -> None:
        """Make room for ``positions`` filled positions, moving every layer to larger buffers if needed."""
        if positions <= self.capacity:
            return
        self.capacity = -(-positions // CAPACITY_STEP) * CAPACITY_STEP
        for store in (self.keys, self.values):
            for l, old in enumerate(store):
                if old is not None:
                    store[l] = _buffer(old, self.capacity)
                    store[l][:, :, :self.length] = old[:, :, :self.length]
        # a graph was captured against the old buffers; the new capacity may need other kernel
        # specialisations, which compile in an eager step (never inside a capture)
        self.decode_graph, self.warm = None, False

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's compact keys/values [R, nkv, T, d] after the filled positions.

        Returns the layer's keys and values to attend to: the filled positions, or for a
        one-token step the whole capacity (the caller masks what is not filled), so that every
        decode step has the same shapes.
        """
        T = keys.shape[2]
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = _buffer(keys, self.capacity), _buffer(values, self.capacity)
        k, v = self.keys[layer], self.values[layer]
        if self.write_position is not None:
            k.index_copy_(2, self.write_position, keys)
            v.index_copy_(2, self.write_position, values)
        else:
            k[:, :, self.length:self.length + T] = keys
            v[:, :, self.length:self.length + T] = values
        if T == 1 and self.length > 0:
            return k, v
        return k[:, :, :self.length + T], v[:, :, :self.length + T]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The filled keys and values of one layer, or None for a layer no row executes."""
        if self.keys[layer] is None:
            return None
        return self.keys[layer][:, :, :self.length], self.values[layer][:, :, :self.length]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``r`` continues from row ``beam_idx[r]``, a beam of the same prompt and so of
        the same plan. Each layer's buffers are rewritten in place (a decode graph reads them)."""
        plan = self.plan
        if not (torch.equal(plan.heads[beam_idx], plan.heads) and torch.equal(plan.groups[beam_idx], plan.groups)
                and torch.equal(plan.layers[beam_idx], plan.layers)):
            raise ValueError("reorder_cache: beam_idx moves rows between different plans; beams of one prompt share its plan")
        for l, idx in enumerate(self.schedule.layers):
            if self.keys[l] is None:
                continue
            if idx.batch_rows is None:
                source = beam_idx
            else:  # the layer holds only its rows: map batch rows to their slots
                slot = torch.full((plan.batch_size,), -1, dtype=torch.long, device=beam_idx.device)
                slot[idx.batch_rows] = torch.arange(idx.num_batch_rows, device=beam_idx.device)
                source = slot[beam_idx[idx.batch_rows]]
            for store in (self.keys, self.values):
                store[l].copy_(store[l].index_select(0, source))
