"""Captioning results in COCO's format, scored by pycocoevalcap (COCO caption evaluation, docs/evaluation.md).

Results are `[{"image_id": int, "caption": str}]`, one per image (the COCO results format `COCO.loadRes` reads).
Scoring follows `pycocoevalcap/eval.py` (`COCOEvalCap.evaluate`): both sides through the Stanford PTB tokenizer,
then BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap's `Cider` is CIDEr-D) and SPICE. Three of those run Java:
- without `java` on the PATH, captions are tokenized by `emu_lightning.metrics.cider.tokenize` (the PTB rules for
  plain English, no Java) and METEOR and SPICE are skipped; the scores then say so in their `notes`;
- SPICE also needs Stanford CoreNLP 3.6.0 in `pycocoevalcap/spice/lib/`, which pycocoevalcap downloads on first use;
  this evaluation never downloads, so without it SPICE is skipped and the notes say so.
The set scored must be the whole reference set: a missing or extra image id is an error, never a smaller average.
"""
from __future__ import annotations

import contextlib
import importlib
import shutil
import sys
from pathlib import Path
from typing import Any

METRICS = ("bleu", "meteor", "rouge", "cider", "spice")
# metric → (pycocoevalcap module, scorer class, constructor args, the score names it returns), as in eval.py.
_SCORERS = {
    "bleu": ("pycocoevalcap.bleu.bleu", "Bleu", (4,), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
    "meteor": ("pycocoevalcap.meteor.meteor", "Meteor", (), ["METEOR"]),
    "rouge": ("pycocoevalcap.rouge.rouge", "Rouge", (), ["ROUGE_L"]),
    "cider": ("pycocoevalcap.cider.cider", "Cider", (), ["CIDEr"]),
    "spice": ("pycocoevalcap.spice.spice", "Spice", (), ["SPICE"]),
}
_NEEDS_JAVA = ("meteor", "spice")


def _pycocoevalcap():
    try:
        import pycocoevalcap
    except ImportError:
        raise ImportError("captioning scores need pycocoevalcap: pip install 'emu-lightning[eval]' "
                          "(pycocoevalcap==1.2)") from None
    return Path(list(pycocoevalcap.__path__)[0])


def check_coverage(refs: dict[Any, list[str]], preds: dict[Any, str], where: str) -> None:
    """Raises unless `preds` has exactly the image ids of `refs` (nothing scored on a shortened set)."""
    missing = [k for k in refs if k not in preds]
    extra = [k for k in preds if k not in refs]
    if missing or extra:
        raise ValueError(f"{where}: {len(missing)} reference image(s) without a caption (e.g. {missing[:3]}) and "
                         f"{len(extra)} caption(s) of unknown images (e.g. {extra[:3]}); the results must caption "
                         f"every reference image exactly once")


def score_captions(refs: dict[Any, list[str]], preds: dict[Any, str], metrics: tuple[str, ...] = METRICS,
                   where: str = "captions") -> dict[str, Any]:
    """pycocoevalcap scores of `preds` (image id → caption) against `refs` (image id → references).

    Returns `{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"}` (those computed) and `notes`: what was
    skipped or replaced, and why.
    """
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown caption metric(s) {bad}; expected a subset of {METRICS}")
    check_coverage(refs, preds, where)
    root = _pycocoevalcap()
    notes: list[str] = []
    java = shutil.which("java") is not None
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
        res = tok.tokenize({k: [{"caption": preds[k]}] for k in refs})
    else:
        from emu_lightning.metrics.cider import tokenize

        gts = {k: [tokenize(c) for c in v] for k, v in refs.items()}
        res = {k: [tokenize(preds[k])] for k in refs}
        notes.append("no java on the PATH: captions tokenized by emu_lightning.metrics.cider.tokenize instead of "
                     "the Stanford PTBTokenizer (same rules for plain English)")
    scores: dict[str, Any] = {}
    with contextlib.redirect_stdout(sys.stderr):   # pycocoevalcap's scorers print their counts
        for name in metrics:
            _score(name, gts, res, java, root, scores, notes)
    empty = sum(not preds[k].strip() for k in refs)
    if empty:
        notes.append(f"{empty} of {len(refs)} captions are empty (scored as they are)")
    return {**scores, "notes": notes}


def _score(name: str, gts: dict, res: dict, java: bool, root: Path, scores: dict, notes: list[str]) -> None:
    """One metric into `scores`, or a note saying why it was skipped."""
    if name in _NEEDS_JAVA and not java:
        notes.append(f"{name.upper()} skipped: it runs Java and there is no java on the PATH")
        return
    if name == "spice" and not (root / "spice" / "lib" / "stanford-corenlp-3.6.0.jar").is_file():
        notes.append(f"SPICE skipped: Stanford CoreNLP 3.6.0 is not in {root / 'spice' / 'lib'} (pycocoevalcap "
                     f"downloads it on first use; this evaluation never downloads)")
        return
    module, cls, args, keys = _SCORERS[name]
    value, _ = getattr(importlib.import_module(module), cls)(*args).compute_score(gts, res)
    values = value if isinstance(value, list) else [value]
    scores.update({k: float(v) for k, v in zip(keys, values)})


def read_caption_results(path: str | Path) -> dict[Any, str]:
    """A COCO results file `[{"image_id", "caption"}]` → image id → caption; a bad record is named."""
    from emu_lightning.data.real.vqa import read_id_map

    return read_id_map(path, "caption results file", "image_id", "caption", "an image already captioned")
