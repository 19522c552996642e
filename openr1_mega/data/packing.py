"""Sequence packing: many tokenised examples in one fixed-budget row, attention kept per document.

Each packed row carries, per token, the input id, the label (the document's next token),
the loss mask, the position within its document (RoPE restarts at every document), and
`cu_seqlens`, the document boundaries. Attention must not cross documents: models pass a
block-diagonal causal mask built from `cu_seqlens` (or TE's packed-sequence params).
Bins are filled first-fit-decreasing, so rows are dense and the packing is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openr1_mega.data.chat import Example


@dataclass
class Packed:
    """One packed row. All tensors [S] except cu_seqlens [D + 1] (D documents)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())


def round_up(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple` (the widths sequence/context
    parallelism split evenly)."""
    return -(-length // multiple) * multiple


def shift_labels(example: Example) -> tuple[list[int], list[int]]:
    """Labels (next token) and their mask for one document; its last token has no label."""
    labels = example.input_ids[1:] + [0]
    mask = example.loss_mask[1:] + [0]
    return labels, mask


def pack_examples(examples: list[Example], max_tokens: int, pad_id: int = 0) -> list[Packed]:
    """Pack examples into rows of exactly `max_tokens` tokens (first-fit decreasing).

    Raises ValueError naming the example when one is longer than `max_tokens`: truncate
    it upstream (encode_conversation's max_length) so no tokens are dropped silently.
    """
    for i, ex in enumerate(examples):
        if len(ex.input_ids) > max_tokens:
            raise ValueError(f"example {i} has {len(ex.input_ids)} tokens > "
                             f"max_tokens={max_tokens}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids)):
        size = len(examples[i].input_ids)
        slot = next((b for b, r in enumerate(room) if r >= size), None)
        if slot is None:
            bins.append([])
            room.append(max_tokens)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= size
    return [_pack_row([examples[i] for i in sorted(b)], max_tokens, pad_id) for b in bins]


def _pack_row(examples: list[Example], max_tokens: int, pad_id: int) -> Packed:
    ids, labels, mask, positions, bounds = [], [], [], [], [0]
    for ex in examples:
        doc_labels, doc_mask = shift_labels(ex)
        ids += ex.input_ids
        labels += doc_labels
        mask += doc_mask
        positions += list(range(len(ex.input_ids)))
        bounds.append(len(ids))
    pad = max_tokens - len(ids)
    if pad:  # the padding is one more document that attends only to itself
        ids += [pad_id] * pad
        labels += [pad_id] * pad
        mask += [0] * pad
        positions += list(range(pad))
        bounds.append(max_tokens)
    return Packed(torch.tensor(ids), torch.tensor(labels), torch.tensor(mask),
                  torch.tensor(positions), torch.tensor(bounds, dtype=torch.int32))


def document_causal_mask(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[S, S] bool, True where attention is NOT allowed (Megatron's convention).

    Token q may attend to token k only when k <= q and both lie in the same document.
    """
    doc = torch.zeros(seq_len, dtype=torch.long)
    doc[cu_seqlens[1:-1].long()] = 1
    doc = doc.cumsum(0)
    pos = torch.arange(seq_len)
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    return ~allowed


def pad_examples(examples: list[Example], pad_id: int = 0, width_multiple: int = 1,
                 width: int | None = None) -> Packed:
    """Examples as a right-padded [B, S] batch (no packing): the unpacked baseline. S is
    `width` (default: the longest example) rounded up to `width_multiple` (sequence
    parallelism splits S)."""
    width = width or max(len(ex.input_ids) for ex in examples)
    width = round_up(width, width_multiple)
    rows = [_pack_row([ex], width, pad_id) for ex in examples]
    return Packed(*(torch.stack([getattr(r, f) for r in rows])
                    for f in ("input_ids", "labels", "loss_mask", "position_ids")),
                  cu_seqlens=torch.tensor([0, width], dtype=torch.int32))
