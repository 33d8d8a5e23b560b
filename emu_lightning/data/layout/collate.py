"""Stage-1 batches: `<s>[IMG]<image>×N[/IMG]caption</s>` with cross-entropy on the caption only (docs/design.md §2).

Labels are -100 everywhere except caption tokens and `</s>`: `<s>`, `[IMG]`, `<image>`, `[/IMG]` and `[PAD]`
are never targets. Sequences are right-padded; a caption that does not fit `max_length` is truncated
(its `</s>` kept) and counted in `batch["num_truncated"]`, which the system logs.
"""
from __future__ import annotations

from typing import Any

import torch

from emu_lightning.data.layout.tokens import SpecialIds

IGNORE = -100


def image_block(ids: SpecialIds, num_tokens: int) -> list[int]:
    """`[IMG]` + `<image>`×N + `[/IMG]`."""
    return [ids.img, *[ids.image] * num_tokens, ids.img_end]


class CaptionCollator:
    """Turns `{"image": (3,H,W), "caption": str, "captions": [...], ...}` samples into a stage-1 batch.

    Args:
        tokenizer: a tokenizer from `emu_lightning.data.layout.tokenizer.load_tokenizer`.
        num_image_tokens: N visual embeddings per image (the adapter's `num_tokens`).
        max_length: longest sequence in tokens, image block included.
    """

    def __init__(self, tokenizer: Any, num_image_tokens: int, max_length: int = 64):
        self.tok = tokenizer
        self.ids = SpecialIds.from_tokenizer(tokenizer)
        self.prompt = [self.ids.bos, *image_block(self.ids, num_image_tokens)]
        if len(self.prompt) + 2 > max_length:
            raise ValueError(f"max_length={max_length} leaves no room for a caption after "
                             f"{len(self.prompt)} prompt tokens (N={num_image_tokens})")
        self.max_length = max_length

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        seqs, labels, truncated = [], [], 0
        room = self.max_length - len(self.prompt) - 1  # caption tokens that fit before </s>
        for s in samples:
            cap = self.tok(s["caption"], add_special_tokens=False)["input_ids"]
            if len(cap) > room:
                cap, truncated = cap[:room], truncated + 1
            target = [*cap, self.ids.eos]
            seqs.append(self.prompt + target)
            labels.append([IGNORE] * len(self.prompt) + target)
        T = max(map(len, seqs))
        input_ids = torch.full((len(seqs), T), self.ids.pad, dtype=torch.long)
        label_t = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, (x, y) in enumerate(zip(seqs, labels)):
            input_ids[i, : len(x)], label_t[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        batch: dict[str, Any] = {
            "input_ids": input_ids,                                    # (B,T)
            "attention_mask": mask,                                    # (B,T) 1 = real token
            "labels": label_t,                                         # (B,T) -100 = no loss
            "pixel_values": torch.stack([s["image"] for s in samples]),  # (B,3,H,W), one image each
            "prompt_ids": torch.tensor([self.prompt] * len(samples)),  # (B,P) generation prompt
            "captions": [s["captions"] for s in samples],              # references for CIDEr
            "ids": [s["id"] for s in samples],
            "num_truncated": torch.tensor(truncated),
            "skipped": sum_counts(s.get("skipped") or {} for s in samples),   # {kind: n} read past for this batch
        }
        if all("scene" in s for s in samples):
            batch["scenes"] = [s["scene"] for s in samples]
        return batch


def sum_counts(counts) -> dict[str, int]:
    """Per-kind skip counts (`{kind: n}`, one per sample or document) summed into the batch's `skipped`, the one
    dict every stage hands to `PartsSystem.count_skips`."""
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + int(v)
    return total
