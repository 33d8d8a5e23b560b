"""CIDEr-D captioning metric (Vedantam et al., 2015) as a torchmetrics ``Metric``.

Follows pycocoevalcap's ``cider_scorer.py`` term for term, so scores are on the COCO scale
(1.12 for a reported 112.0): n-grams n=1..4, TF-IDF with document frequency counted over the
references of the whole evaluated corpus, clipped cosine similarity per n, a gaussian length
penalty (sigma=6), mean over n, ×10, mean over references, then mean over images.

Because the IDF depends on every image, nothing can be reduced per batch: the metric keeps the
tokenized captions themselves, as tensors of UTF-8 byte codes that ``dist_reduce_fx="cat"`` gathers
across ranks, and scores the whole corpus in ``compute()``.
"""

import math
import re
from collections import Counter

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

NGram = tuple[str, ...]

# PTB splits clitics off the word ("dog's" -> "dog 's", "don't" -> "do n't") and keeps them as tokens.
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'m|'ll|'d)\b")
_CLITICS = {"n't", "'s", "'re", "'ve", "'m", "'ll", "'d"}
# Always separate PTB tokens that COCO's tokenizer then drops (brackets become -LRB- etc., also dropped).
_DROPPED = re.compile(r"""[.,!?;:"()\[\]{}]""")


def tokenize(text: str) -> str:
    """Lowercase and strip punctuation the way COCO's PTBTokenizer + punctuation filter does for English.

    "A dog's ball, (red)!" -> "a dog 's ball red". No Java: a few regexes cover plain captions.
    """
    text = _DROPPED.sub(" ", _CLITIC.sub(r" \1", text.lower()))
    words = []
    for word in text.split():
        if word not in _CLITICS:
            word = word.strip("'`-")  # edge quotes and dashes are separate PTB tokens that COCO drops
        if word:
            words.append(word)
    return " ".join(words)


def _ngram_counts(caption: str, n: int) -> Counter[NGram]:
    """Term frequencies of every k-gram, k = 1..n, of a tokenized caption."""
    words = caption.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(preds: list[str], refs: list[list[str]], n: int = 4, sigma: float = 6.0) -> list[float]:
    """Per-image CIDEr-D of tokenized ``preds`` against tokenized ``refs``; the corpus score is their mean."""
    pred_counts = [_ngram_counts(p, n) for p in preds]
    ref_counts = [[_ngram_counts(r, n) for r in image_refs] for image_refs in refs]

    # Document frequency: in how many images' reference sets each n-gram occurs at least once.
    doc_freq: Counter[NGram] = Counter()
    for image_refs in ref_counts:
        doc_freq.update(set().union(*image_refs))
    log_num_images = math.log(len(refs))

    def tfidf(counts: Counter[NGram]) -> tuple[list[dict[NGram, float]], list[float], int]:
        """Per-order TF-IDF vectors, their L2 norms, and the caption length in words."""
        vec: list[dict[NGram, float]] = [{} for _ in range(n)]
        for gram, tf in counts.items():
            # An n-gram absent from every reference gets df 1, i.e. the maximal idf log(N).
            vec[len(gram) - 1][gram] = tf * (log_num_images - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        # pycocoevalcap counts bigrams as "length" (words - 1); the difference cancels in the penalty
        # whenever both captions are non-empty, and an empty caption scores 0 either way.
        length = sum(tf for gram, tf in counts.items() if len(gram) == 1)
        return vec, norms, length

    scores = []
    for pred, image_refs in zip(pred_counts, ref_counts):
        vec, norm, length = tfidf(pred)
        total = 0.0
        for ref in image_refs:
            vec_ref, norm_ref, length_ref = tfidf(ref)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma**2))
            sims = []
            for k in range(n):
                # CIDEr-D clipping: a candidate n-gram earns at most its weight in the reference.
                dot = sum(min(w, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and norm_ref[k] != 0:
                    dot /= norm[k] * norm_ref[k]
                sims.append(dot * penalty)
            total += sum(sims) / n
        scores.append(10.0 * total / len(image_refs))
    return scores


class CIDErD(Metric):
    """Corpus CIDEr-D over ``update(preds, refs)`` calls; captions are tokenized with :func:`tokenize`.

    Args:
        n: Largest n-gram order.
        sigma: Standard deviation of the gaussian length penalty, in words.
        **kwargs: Forwarded to ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, n: int = 4, sigma: float = 6.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n = n
        self.sigma = sigma
        # Per image: the UTF-8 bytes of "pred\nref_1\n...\nref_k\n" (tokenized text holds no "\n"), and k.
        # Stored in self.dtype, not uint8/long: torchmetrics gives a rank with no samples an empty
        # self.dtype tensor, and all_gather needs one dtype on every rank. Bytes are exact even in bf16.
        self.add_state("text", default=[], dist_reduce_fx="cat")
        self.add_state("num_refs", default=[], dist_reduce_fx="cat")

    def update(self, preds: list[str], refs: list[list[str]]) -> None:
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} predictions but {len(refs)} reference lists")
        for i, (pred, image_refs) in enumerate(zip(preds, refs)):
            if not image_refs:
                raise ValueError(f"sample {i}: no reference captions")
            record = "".join(tokenize(s) + "\n" for s in [pred, *image_refs]).encode()
            self.text.append(torch.tensor(list(record), dtype=self.dtype, device=self.device))
        self.num_refs.append(torch.tensor([len(r) for r in refs], dtype=self.dtype, device=self.device))

    def _captions(self) -> tuple[list[str], list[list[str]]]:
        """Decode the byte states back into (preds, refs)."""
        num_refs = dim_zero_cat(self.num_refs).long().tolist() if len(self.num_refs) else []
        if not num_refs:
            raise ValueError("CIDErD has no samples: call update() before compute()")
        codes = dim_zero_cat(self.text).to(torch.uint8).cpu()
        lines = bytes(codes.numpy()).decode().split("\n")[:-1]
        preds, refs, start = [], [], 0
        for k in num_refs:
            preds.append(lines[start])
            refs.append(lines[start + 1 : start + 1 + k])
            start += 1 + k
        assert start == len(lines), f"decoded {len(lines)} captions but expected {start}"
        return preds, refs

    def compute(self) -> Tensor:
        scores = cider_d(*self._captions(), n=self.n, sigma=self.sigma)
        return torch.tensor(sum(scores) / len(scores), dtype=torch.float64)

    def per_sample(self) -> Tensor:
        """(I,) CIDEr-D of each image in update order (gathered across ranks, like ``compute``)."""
        with self.sync_context(should_sync=self.sync_on_compute):
            scores = cider_d(*self._captions(), n=self.n, sigma=self.sigma)
        return torch.tensor(scores, dtype=torch.float64)
