"""The KV cache of a patched model: executed layers and executed key/value heads only.

One request's plan is fixed at prefill and kept here, so decode steps reuse it. Layer ``l``
holds keys and values for the batch rows that execute it, compact over their active key/value
heads: [rows of l, active kv heads (padded to the row maximum), tokens, head_dim].
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class AdaptiveCache(Cache):
    """A transformers ``Cache`` that ``generate`` carries between steps.

    ``get_seq_length()`` counts every cached position, the latency token's included;
    ``latency_index`` is that token's column (None when the request has none).
    """

    is_compileable = False

    def __init__(self, num_layers: int, latency_index: int | None, schedule=None):
        super().__init__(layers=[])
        self.schedule = schedule  # set once the plan is known (after the prefix, with a budget)
        self.latency_index = latency_index
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0

    @property
    def plan(self):
        return self.schedule.plan

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def append(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one step's compact keys/values [R, nkv, T, d] to a layer; returns all of them."""
        if self.keys[layer_idx] is not None:
            keys = torch.cat([self.keys[layer_idx], keys], dim=2)
            values = torch.cat([self.values[layer_idx], values], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        return keys, values

    def stored_heads(self) -> list[int]:
        """Per layer, the key/value heads held (rows times heads; 0 for a skipped layer)."""
        return [0 if k is None else k.shape[0] * k.shape[1] for k in self.keys]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported by adaptive_kernels; use greedy or sampling")
