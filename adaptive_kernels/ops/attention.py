"""Attention over the active heads only, against a compact KV cache that holds only executed heads."""

from __future__ import annotations

import torch


def head_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_to_kv: torch.Tensor,
                                    kv_valid: torch.Tensor, scale: float) -> torch.Tensor:
    """``o[r, t, i] = softmax_j(scale * q[r, t, i] . k[r, c, j]) @ v[r, c, j]`` with ``c = q_to_kv[r, i]``.

    The softmax runs over the visible keys: ``kv_valid[r, j]`` and ``j <= Tk - T + t`` (the T
    queries are the last T positions of the Tk keys, causal). A query that sees no key, or whose
    ``q_to_kv`` is -1 (padding), gets 0.
    q [R, T, nq, d]; k, v [R, nkv, Tk, d] (compact: executed key/value heads only);
    q_to_kv int64 [R, nq]; kv_valid bool [R, Tk] -> o [R, T, nq, d].
    """
    R, T, nq, d = q.shape
    Tk = k.shape[2]
    index = q_to_kv.clamp_min(0)[:, :, None, None].expand(-1, -1, Tk, d)
    keys, values = k.gather(1, index), v.gather(1, index)
    scores = torch.matmul(q.transpose(1, 2), keys.transpose(-1, -2)) * scale
    causal = torch.arange(Tk, device=q.device) <= torch.arange(Tk - T, Tk, device=q.device)[:, None]
    visible = (causal & kv_valid[:, None, :]).unsqueeze(1)
    probs = torch.softmax(scores.float().masked_fill(~visible, float("-inf")), dim=-1)
    probs = probs.nan_to_num(0.0).to(values.dtype)
    out = torch.matmul(probs, values).transpose(1, 2)
    return out.masked_fill((q_to_kv < 0)[:, None, :, None], 0)
