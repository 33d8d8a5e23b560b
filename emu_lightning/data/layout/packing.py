"""Packing: several short stage-2 documents in one row, each attending only to itself.

A batch of short documents padded to the longest wastes most of its tokens on `[PAD]`. `PackingCollator`
encodes each document exactly as `SequenceCollator` does (same `<s>…</s>`, image blocks, labels, truncation)
and lays them end to end in rows of at most `max_length` tokens, first fit in document order, never mixing
data sources in a row (the per-source losses stay per row). What changes is only the attention mask: instead
of 1/0 it numbers the documents of each row 1, 2, ... (0 = padding), and `LlamaLM` then attends block-
diagonally with positions restarting per document, so every document sees what it would see alone.

Both losses carry over unchanged: the CE labels are the documents' own (each `<s>` is -100, so nothing is
predicted across a boundary), and the regression targets are read off `input_ids` and the images, which stay
in reading order (row by row, document by document). Packed and unpacked batches give the same losses.
"""
from __future__ import annotations

from typing import Any

import torch

from emu_lightning.data.layout.collate import IGNORE, sum_counts
from emu_lightning.data.layout.sequence import SequenceCollator, pad


class PackingCollator:
    """Documents → packed rows (see the module docstring).

    Args:
        collator: the `SequenceCollator` that encodes each document (its `max_length` cuts long documents).
        max_length: tokens per packed row; None = the collator's `max_length`.
    """

    def __init__(self, collator: SequenceCollator, max_length: int | None = None):
        self.collator = collator
        self.max_length = max_length or collator.max_length
        if self.max_length < collator.max_length:
            raise ValueError(f"packed rows of {self.max_length} tokens cannot hold a document of up to "
                             f"collator.max_length={collator.max_length}")

    def __call__(self, docs: list[dict]) -> dict[str, Any]:
        """`docs` as for `SequenceCollator`: `{"id", "source", "segments", "regress"}` each."""
        rows: list[dict] = []        # each: source, ids, labels, segments, images, regress, doc ids
        open_row: dict[str, dict] = {}
        truncated = 0
        for d in docs:
            ids, labels, images, cut = self.collator.encode(d["segments"])
            truncated += cut
            mode = d.get("regress", "all")
            regress = [mode == "all" or (mode == "last" and i == len(images) - 1) for i in range(len(images))]
            row = open_row.get(d["source"])
            if row is None or len(row["ids"]) + len(ids) > self.max_length:
                row = {"source": d["source"], "ids": [], "labels": [], "segments": [], "images": [],
                       "regress": [], "docs": []}
                rows.append(row)
                open_row[d["source"]] = row
            n = len(row["docs"]) + 1                     # this document's number in its row
            row["ids"] += ids
            row["labels"] += labels
            row["segments"] += [n] * len(ids)
            row["images"] += images
            row["regress"] += regress
            row["docs"].append(d["id"])
        sources = sorted({r["source"] for r in rows})
        input_ids, _ = pad([r["ids"] for r in rows], self.collator.ids.pad)
        labels, _ = pad([r["labels"] for r in rows], IGNORE)
        segments, _ = pad([r["segments"] for r in rows], 0)
        images = [im for r in rows for im in r["images"]]
        return {
            "input_ids": input_ids,                                                     # (R,T) R packed rows
            "attention_mask": segments,                                                 # (R,T) document 1.. / 0
            "labels": labels,                                                           # (R,T)
            "pixel_values": torch.stack(images) if images else torch.zeros(0, 3, 1, 1),  # (n_images,3,H,W)
            "regress_images": torch.tensor([f for r in rows for f in r["regress"]], dtype=torch.bool),
            "source_index": torch.tensor([sources.index(r["source"]) for r in rows]),  # (R,)
            "source_names": sources,
            "ids": [r["docs"] for r in rows],                                          # document ids per row
            "num_truncated": torch.tensor(truncated),
            "skipped": sum_counts(d.get("skipped") or {} for d in docs),                # {kind: n} read past
            "num_documents": torch.tensor(len(docs)),
        }
