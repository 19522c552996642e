"""Attention over shared-prompt rows: one prompt, then several of its completions.

A GRPO group is G completions of one prompt. Laid out as one row, [prompt | c_1 | ... | c_G],
the prompt's tokens pass through the model once instead of G times; each completion must then
attend to the prompt and to itself only, at RoPE positions that continue the prompt's
(models/hidden.py `rope_positions`). A dense [S, S] mask would make every completion's
queries pay for the whole row's keys; instead two small attentions run per layer:

  prompts      each row's prompt tokens, causal: [R, P] queries x [R, P] keys
  completions  each completion's tokens against its prompt's keys + its own, causal within
               its own: [C, T] queries x [C, P + T] keys (the keys gathered, not copied back)

so the attention costs what one row per completion would, while the projections and MLPs
run on the shared rows. Hidden states are addressed by a flat index s * R + r into the
[S, R, ...] (sequence-first) layout Megatron uses; padding tokens get zero attention output
(no real token reads them). The layout travels to the core attention as a
`PackedSeqParams` subclass, which Megatron hands through unchanged (also under activation
recompute, where a non-tensor attention mask could not travel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class SharedPromptParams(PackedSeqParams):
    """Index tensors of one micro-batch of shared-prompt rows (see the module docstring)."""

    prompt_tokens: torch.Tensor = None
    """[R, P] flat index of each row's prompt tokens (padding slots: any valid index)."""
    completion_tokens: torch.Tensor = None
    """[C, T] flat index of each completion's tokens."""
    completion_keys: torch.Tensor = None
    """[C, P + T] its prompt's tokens, then its own."""
    completion_mask: torch.Tensor = None
    """[C, 1, T, P + T] bool, True where a completion query may attend."""
    prompt_scatter: tuple[torch.Tensor, torch.Tensor] = None
    """(flat token index, index into the [R * P] prompt outputs) of every real prompt token."""
    completion_scatter: tuple[torch.Tensor, torch.Tensor] = None
    """The same for completion tokens into the [C * T] completion outputs."""


def shared_prompt_params(rows: list[tuple[int, list[int]]], num_rows: int, width: int,
                         device: torch.device | str = "cpu") -> SharedPromptParams:
    """The layout of rows [R, S] whose row r holds a prompt of rows[r][0] tokens followed by
    completions of rows[r][1] tokens each (rows past len(rows) are padding)."""
    too_long = [r for r, (p, lengths) in enumerate(rows) if p + sum(lengths) > width]
    if too_long:
        raise ValueError(f"shared-prompt row {too_long[0]} is longer than the width {width}")
    prompt_len = max([p for p, _ in rows] + [1])
    steps = max([n for _, lengths in rows for n in lengths] + [1])
    prompt, t = torch.arange(prompt_len), torch.arange(steps)
    key_slot = torch.arange(prompt_len + steps)[None, :]
    own_turn = (key_slot >= prompt_len) & (key_slot - prompt_len <= t[:, None])  # causal
    prompt_tokens = torch.zeros(num_rows, prompt_len, dtype=torch.long)
    queries, keys, allowed = [], [], []
    p_flat, p_pick, c_flat, c_pick = [], [], [], []
    for r, (p, lengths) in enumerate(rows):
        own_prompt = torch.where(prompt < p, prompt, 0) * num_rows + r
        prompt_tokens[r] = own_prompt
        p_flat.append(own_prompt[:p])
        p_pick.append(r * prompt_len + prompt[:p])
        start = p
        for n in lengths:
            own = torch.where(t < n, start + t, 0) * num_rows + r
            c_flat.append(own[:n])
            c_pick.append(len(queries) * steps + t[:n])
            queries.append(own)
            keys.append(torch.cat([own_prompt, own]))
            allowed.append((key_slot < p) | own_turn)
            start += n
    if not queries:  # no completion in this micro-batch: one empty slot keeps shapes valid
        queries = [torch.zeros(steps, dtype=torch.long)]
        keys = [torch.zeros(prompt_len + steps, dtype=torch.long)]
        allowed = [torch.ones(steps, prompt_len + steps, dtype=torch.bool)]
    return SharedPromptParams(
        qkv_format="sbhd", max_seqlen_q=width, max_seqlen_kv=width,
        prompt_tokens=prompt_tokens.to(device),
        completion_tokens=torch.stack(queries).to(device),
        completion_keys=torch.stack(keys).to(device),
        completion_mask=torch.stack(allowed)[:, None].to(device),
        prompt_scatter=(_cat(p_flat).to(device), _cat(p_pick).to(device)),
        completion_scatter=(_cat(c_flat).to(device), _cat(c_pick).to(device)))


def shared_prompt_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            params: SharedPromptParams, scale: float, dropout: float = 0.0
                            ) -> torch.Tensor:
    """query [s, b, n, d], key/value [s, b, g, d] of shared-prompt rows -> [s, b, n * d]."""
    seq, batch, heads, dim = query.shape
    q, k, v = (x.reshape(seq * batch, x.shape[2], dim) for x in (query, key, value))
    gqa = q.shape[1] != k.shape[1]

    def gathered(x, index):  # [N, L] flat indices -> [N, heads, L, d]; backward: index_add
        return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:]) \
            .movedim(-3, -2)

    prompt_out = F.scaled_dot_product_attention(
        gathered(q, params.prompt_tokens), gathered(k, params.prompt_tokens),
        gathered(v, params.prompt_tokens), is_causal=True, dropout_p=dropout, scale=scale,
        enable_gqa=gqa)
    completion_out = F.scaled_dot_product_attention(
        gathered(q, params.completion_tokens), gathered(k, params.completion_keys),
        gathered(v, params.completion_keys), attn_mask=params.completion_mask,
        dropout_p=dropout, scale=scale, enable_gqa=gqa)
    out = q.new_zeros(seq * batch, heads, dim)
    for part, (flat, pick) in ((prompt_out, params.prompt_scatter),
                               (completion_out, params.completion_scatter)):
        rows = part.movedim(-2, -3).reshape(-1, heads, dim)  # [slots, heads, d]
        out = out.index_copy(0, flat, rows.index_select(0, pick))
    return out.view(seq, batch, heads * dim)


def _cat(pieces: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
