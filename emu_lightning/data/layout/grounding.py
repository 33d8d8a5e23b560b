"""Grounding tokens: phrases tied to boxes, as Emu2 writes them (docs/design.md §2 "Grounded").

A grounded phrase is ``<p>phrase</p><coor><loc x1><loc y1><loc x2><loc y2></coor>``, or the box
first (``<coor>…</coor><p>phrase</p>``; Emu2 puts the phrase first with p 0.7). Each coordinate
becomes a bin ``round(coordinate / side × 224)`` clamped to 0..224, written as ``LOCS[bin]``
(``<loc000>``..``<loc224>``). Parsing returns bin centres ``bin / 224 × side``, so a round trip
moves each coordinate in [0, side] by at most ``side / 448`` (half a bin).
"""

from __future__ import annotations

import re

from emu_lightning.data.layout.tokens import LOCS

__all__ = ["NUM_BINS", "box_bins", "box_tokens", "grounded", "parse_grounded", "strip_grounding"]

NUM_BINS = len(LOCS) - 1  # 224: bins 0..224 inclusive
_LOC_INDEX = {tok: i for i, tok in enumerate(LOCS)}
# One grounding element: a phrase or a box (non-greedy, so neighbours never merge).
_ELEMENT = re.compile(r"<p>(?P<phrase>.*?)</p>|<coor>(?P<coor>.*?)</coor>", re.S)
_ANY_LOC = re.compile(r"<loc[^>]*>")
_TAGS = re.compile(r"</?p>|</?coor>")

Box = tuple[float, float, float, float]


def box_bins(box: Box, side: float = 1.0) -> tuple[int, int, int, int]:
    """The four bins of ``(x1, y1, x2, y2)`` given in units where the image side is ``side``.

    Args:
        box: corners, top-left then bottom-right; x2 >= x1 and y2 >= y1.
        side: image side in the box's units (1.0 for fractions, the pixel side for pixels).
    """
    if side <= 0:
        raise ValueError(f"side={side}; expected > 0")
    if len(box) != 4:
        raise ValueError(f"box {box!r} has {len(box)} coordinates; expected (x1, y1, x2, y2)")
    x1, y1, x2, y2 = box
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box {box!r} has x2 < x1 or y2 < y1; expected (x1, y1, x2, y2) top-left first")
    return tuple(min(NUM_BINS, max(0, round(c / side * NUM_BINS))) for c in box)  # type: ignore[return-value]


def box_tokens(box: Box, side: float = 1.0) -> str:
    """``<coor><locA><locB><locC><locD></coor>`` for ``box`` (see `box_bins`)."""
    return "<coor>" + "".join(LOCS[b] for b in box_bins(box, side)) + "</coor>"


def grounded(phrase: str, box: Box, side: float = 1.0) -> str:
    """``<p>phrase</p><coor>…</coor>``: the phrase first, as Emu2 writes it with p 0.7."""
    if "<" in phrase or ">" in phrase:
        raise ValueError(f"phrase {phrase!r} contains '<' or '>'; grounding tags cannot nest")
    return f"<p>{phrase}</p>" + box_tokens(box, side)


def _parse_coor(whole: str, inner: str, side: float) -> Box:
    """Bin centres of one ``<coor>`` element; ``whole`` is its text, for the error."""
    locs = _ANY_LOC.findall(inner)
    rest = _ANY_LOC.sub("", inner).strip()
    unknown = [t for t in locs if t not in _LOC_INDEX]
    if rest or unknown or len(locs) != 4:
        why = (f"unknown loc token {unknown[0]!r} (expected <loc000>..<loc{NUM_BINS}>)" if unknown
               else f"stray text {rest!r}" if rest else f"{len(locs)} loc tokens")
        raise ValueError(f"malformed grounding box {whole!r}: {why}; expected exactly 4 loc tokens")
    bins = [_LOC_INDEX[t] for t in locs]
    if bins[2] < bins[0] or bins[3] < bins[1]:
        raise ValueError(f"malformed grounding box {whole!r}: x2 < x1 or y2 < y1")
    return tuple(b / NUM_BINS * side for b in bins)  # type: ignore[return-value]


def parse_grounded(text: str, side: float = 1.0) -> list[tuple[str, Box]]:
    """``(phrase, box)`` for each grounded phrase of ``text``, in order of appearance.

    A phrase and a box pair up when only whitespace separates them, in either order. A box or a
    phrase with no partner, an unclosed tag, or a ``<coor>`` not holding exactly 4 known loc
    tokens raises ValueError quoting the offending substring.

    Args:
        text: text with ``<p>…</p>`` / ``<coor>…</coor>`` elements.
        side: image side in the units of the returned boxes.
    """
    elements = list(_ELEMENT.finditer(text))
    leftover = _ELEMENT.sub(" ", text)
    stray = _TAGS.search(leftover) or _ANY_LOC.search(leftover)
    if stray is not None:
        raise ValueError(
            f"malformed grounding in {text!r:.200}: stray {stray.group(0)!r} outside a <p>…</p><coor>…</coor> pair"
        )
    out, k = [], 0
    while k < len(elements):
        a = elements[k]
        b = elements[k + 1] if k + 1 < len(elements) else None
        adjacent = b is not None and not text[a.end() : b.start()].strip()
        if adjacent and (a.group("phrase") is None) != (b.group("phrase") is None):
            p, c = (a, b) if a.group("phrase") is not None else (b, a)
            out.append((p.group("phrase").strip(), _parse_coor(c.group(0), c.group("coor"), side)))
            k += 2
            continue
        what = "phrase" if a.group("phrase") is not None else "box"
        raise ValueError(f"grounding {what} {a.group(0)!r} has no adjacent {'box' if what == 'phrase' else 'phrase'}")
    return out


def strip_grounding(text: str) -> str:
    """``text`` with boxes and tags removed and phrases kept ("a <p>cat</p><coor>…</coor>" -> "a cat")."""
    text = re.sub(r"<coor>.*?</coor>|</?p>|<grounding>", "", text, flags=re.S)
    text = re.sub(r"[ \t]+", " ", text)  # a dropped box between spaces leaves two
    return re.sub(r" ?\n ?", "\n", text).strip()
