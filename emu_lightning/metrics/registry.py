"""The evaluation metrics every system logs, in one registry, and the store that keeps them per evaluation set.

`METRICS` maps a metric's name to how it is made and the tag its values are logged under. A system asks its
`MetricStore` for the metric of (evaluation set, name[, variant]): made on first use, then updated by the system;
at the end of a validation or test loop `MetricStore.log_and_reset` computes, logs and resets every metric that loop
updated. A value's tag is `<set>/<log>`, `{key}` in `log` standing for each key of a dict-valued `compute()`,
followed by `_<variant>` when there is one:

    ("val", "cider", "greedy")        → val/cider_greedy
    ("val", "attributes", "beam")     → val/color_acc_beam, val/shape_acc_beam, ...
    ("vqa", "vqa_acc", "k2_rices")    → vqa/vqa_acc_k2_rices
    ("val", "t2i")                    → val/t2i_color, val/t2i_shape, ...
    ("val", "recon")                  → val/psnr, val/ssim

A new metric is one entry here (docs/extending.md, "Add a metric").

Metrics are not checkpoint state. The store holds them in a plain dict, not as submodules: their states are
non-persistent anyway, and the networks some of them hold (FID's feature network) stay out of the system's
`state_dict` and parameters, so a checkpoint loads strictly into a fresh system whatever was evaluated. Each metric
is made on the system's `device` (right under FSDP too, which places parameters without `.to`), and the store passes
later device moves of the system (`.to`, `.cuda`, `.cpu`) on to its metrics; their dtypes stay their own (float64
sums are not cast down by a `.to(torch.bfloat16)`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from emu_lightning.metrics.attributes import SceneAttributeAccuracy
from emu_lightning.metrics.binding import BindingAccuracy
from emu_lightning.metrics.cider import CIDErD
from emu_lightning.metrics.edit import EditAccuracy
from emu_lightning.metrics.embedding import EmbeddingSimilarity
from emu_lightning.metrics.image_quality import make_fid, reconstruction_metrics
from emu_lightning.metrics.retrieval import RetrievalAccuracy
from emu_lightning.metrics.semantic import SemanticAccuracy
from emu_lightning.metrics.vqa import VQAAccuracy

Key = tuple[str, str, "str | None"]   # (evaluation set, metric name, variant or None)


@dataclass(frozen=True)
class MetricSpec:
    """How a registered metric is made and where its values are logged.

    Args:
        make: a torchmetrics `Metric` class, or a function returning a `Metric` (or `MetricCollection`); called on
            first use with the keyword arguments given to `MetricStore.metric` (a judge, FID's feature choice).
        log: the tag under the evaluation set; `{key}` stands for each key of a dict-valued `compute()` and must
            appear exactly when `compute()` returns a dict.
    """

    make: Callable[..., Metric]
    log: str


METRICS: dict[str, MetricSpec] = {
    # captions (stage 1, few-shot stage 2): CIDEr-D; on synthetic scenes, the attributes each caption names right
    "cider": MetricSpec(CIDErD, "cider"),
    "attributes": MetricSpec(SceneAttributeAccuracy, "{key}_acc"),
    # answers: the official VQA rules; the chat's free answers under the lenient ones (metrics/vqa.py)
    "vqa_acc": MetricSpec(VQAAccuracy, "vqa_acc"),
    "videoqa_acc": MetricSpec(VQAAccuracy, "videoqa_acc"),
    "answer_acc": MetricSpec(partial(VQAAccuracy, rules="lenient"), "answer_acc"),
    "binding_acc": MetricSpec(BindingAccuracy, "binding_acc"),
    # generated image embeddings against the encoder's
    "gen": MetricSpec(EmbeddingSimilarity, "gen_{key}"),
    # images read by the frozen scene judge (make with classifier=...): generated, reconstructed, edited
    "t2i": MetricSpec(SemanticAccuracy, "t2i_{key}"),
    "semantic": MetricSpec(SemanticAccuracy, "semantic_{key}"),
    "edit": MetricSpec(EditAccuracy, "edit_{key}"),
    # decoder reconstructions: PSNR / SSIM, and FID (make with feature=, classifier=, weights_path=)
    "recon": MetricSpec(reconstruction_metrics, "{key}"),
    "fid": MetricSpec(make_fid, "fid"),
    # contrastive pretraining (stage 0): in-batch image→text and text→image retrieval
    "retrieval": MetricSpec(RetrievalAccuracy, "{key}_acc"),
}


def spec(name: str) -> MetricSpec:
    """The registered `MetricSpec` of `name`; a KeyError lists the registered names."""
    if name not in METRICS:
        raise KeyError(f"no metric {name!r} in emu_lightning.metrics.registry.METRICS; registered: {sorted(METRICS)}")
    return METRICS[name]


def tags(set_name: str, name: str, variant: str | None, value: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """{tag: value} of one computed metric (module docstring): `value` a tensor, or a dict of them."""
    log = spec(name).log
    if isinstance(value, Mapping) != ("{key}" in log):
        raise ValueError(f"metric {name!r} computed a {'dict' if isinstance(value, Mapping) else 'single value'} but "
                         f"its log name {log!r} {'lacks' if isinstance(value, Mapping) else 'has'} a {{key}}: "
                         f"a dict's values need one tag each, a single value one tag")
    suffix = f"_{variant}" if variant else ""
    items = value.items() if isinstance(value, Mapping) else [(None, value)]
    return {f"{set_name}/{log.format(key=k)}{suffix}": v for k, v in items}


def _updated(metric: nn.Module) -> bool:
    """Whether `update` reached the metric (or any metric of a `MetricCollection`) since its last reset."""
    return any(m.update_called for m in metric.modules() if isinstance(m, Metric))


class MetricStore(nn.Module):
    """The metrics of one system, one per (evaluation set, registered name, variant), made on first use.

    In an evaluation step `self.metrics.metric(name, "cider", "greedy").update(preds, refs)`, at the end of the loop
    `self.metrics.log_and_reset()`. `key in store` and `store[key]` take the (set, name) or (set, name, variant)
    tuple; iterating gives the (set, name, variant) keys made so far.

    Args:
        owner: the system (a LightningModule): metrics are made on its `device` and logged through its `log`. Held
            in a tuple, so the store does not make the system its own submodule.
    """

    def __init__(self, owner: Any) -> None:
        super().__init__()
        self._owner = (owner,)
        self._metrics: dict[Key, nn.Module] = {}   # not a ModuleDict: never state_dict or parameters (docstring)

    @staticmethod
    def _key(key: tuple) -> Key:
        if not isinstance(key, tuple) or len(key) not in (2, 3):
            raise KeyError(f"a metric key is (set, name) or (set, name, variant); got {key!r}")
        return key if len(key) == 3 else (*key, None)

    def metric(self, set_name: str, name: str, variant: str | None = None, **make: Any) -> nn.Module:
        """The metric of (set, name, variant): on first use made by `METRICS[name].make(**make)` on the system's
        device with gradients off; later calls return it and ignore `make`."""
        key = (set_name, name, variant)
        if key not in self._metrics:
            metric = spec(name).make(**make)
            self._metrics[key] = metric.to(self._owner[0].device).requires_grad_(False)
        return self._metrics[key]

    def log_and_reset(self) -> None:
        """Compute every metric updated since its last reset, log its tags through the system's `log` and reset it.
        Metrics not updated (the sets of the other loop, validation vs test) are left alone."""
        log = self._owner[0].log
        for (set_name, name, variant), metric in self._metrics.items():
            if not _updated(metric):
                continue
            for tag, value in tags(set_name, name, variant, metric.compute()).items():
                log(tag, value, add_dataloader_idx=False)
            metric.reset()

    def __contains__(self, key: tuple) -> bool:
        return self._key(key) in self._metrics

    def __getitem__(self, key: tuple) -> nn.Module:
        return self._metrics[self._key(key)]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._metrics)

    def __len__(self) -> int:
        return len(self._metrics)

    def _apply(self, fn: Callable, recurse: bool = True) -> MetricStore:
        # The system's .to / .cuda / .cpu reach here: each metric follows the device (read off a probe tensor), not
        # the dtype.
        super()._apply(fn, recurse)
        for metric in self._metrics.values():
            device = next(m.device for m in metric.modules() if isinstance(m, Metric))
            metric.to(fn(torch.empty(0, device=device)).device)
        return self

    def extra_repr(self) -> str:
        return ", ".join("/".join(k for k in key if k) for key in self._metrics)
