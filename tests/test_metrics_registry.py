"""The metric registry and store every system logs through (`emu_lightning/metrics/registry.py`): tag names, made once
per (set, name, variant), only updated metrics logged and reset, never checkpoint state, device moves followed."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from emu_lightning.metrics.registry import METRICS, MetricStore, tags
from emu_lightning.metrics.semantic import JudgedMetric, SceneClassifier, render_batch

pytestmark = pytest.mark.usefixtures("one_thread")


class Owner(L.LightningModule):
    """The least a store needs of its system: weights, a device and `log`."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.metrics = MetricStore(self)
        self.logged: dict[str, float] = {}

    def log(self, name, value, **kwargs) -> None:
        assert kwargs == {"add_dataloader_idx": False}
        self.logged[name] = float(value)


@pytest.mark.parametrize("key, value, expected", [
    (("val", "cider", "greedy"), torch.tensor(0.5), ["val/cider_greedy"]),
    (("heldout", "attributes", "beam"), {"color": 1, "pair_all": 0},
     ["heldout/color_acc_beam", "heldout/pair_all_acc_beam"]),
    (("vqa", "vqa_acc", "k2_rices"), torch.tensor(0.5), ["vqa/vqa_acc_k2_rices"]),
    (("videos", "videoqa_acc", "k0"), torch.tensor(0.5), ["videos/videoqa_acc_k0"]),
    (("episodes", "binding_acc", None), torch.tensor(0.5), ["episodes/binding_acc"]),
    (("chat", "answer_acc", None), torch.tensor(0.5), ["chat/answer_acc"]),
    (("captions", "gen", None), {"cos": 1, "mse": 0}, ["captions/gen_cos", "captions/gen_mse"]),
    (("val", "t2i", None), {"color": 1}, ["val/t2i_color"]),
    (("val", "semantic", None), {"both": 1}, ["val/semantic_both"]),
    (("val_edit", "edit", None), {"kept": 1}, ["val_edit/edit_kept"]),
    (("val", "recon", None), {"psnr": 1, "ssim": 0}, ["val/psnr", "val/ssim"]),
    (("val", "fid", None), torch.tensor(3.0), ["val/fid"]),
])
def test_tags_are_the_ones_the_systems_always_logged(key, value, expected):
    assert list(tags(*key, value)) == expected


def test_a_log_name_fits_its_result_and_an_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="'gen' computed a single value"):
        tags("val", "gen", None, torch.tensor(1.0))
    with pytest.raises(ValueError, match="'cider' computed a dict"):
        tags("val", "cider", "greedy", {"a": torch.tensor(1.0)})
    with pytest.raises(KeyError, match="registered: .*'cider'"):
        Owner().metrics.metric("val", "ciderr")


def test_store_makes_each_metric_once_and_logs_only_what_the_loop_updated():
    owner = Owner()
    store = owner.metrics
    k0 = store.metric("vqa", "vqa_acc", "k0")
    assert store.metric("vqa", "vqa_acc", "k0") is k0 and ("vqa", "vqa_acc", "k0") in store
    assert store.metric("vqa", "vqa_acc", "k2_random") is not k0
    gen = store.metric("test", "gen")                        # a set of the other loop: made, never updated
    assert store["test", "gen"] is gen and ("test", "gen", None) in store and len(store) == 3
    store.metric("vqa", "vqa_acc", "k0").update(["yes", "no"], [["yes"] * 10, ["yes"] * 10])
    store.metric("vqa", "vqa_acc", "k2_random").update(["yes"], [["yes"] * 10])
    store.log_and_reset()
    assert owner.logged == {"vqa/vqa_acc_k0": 0.5, "vqa/vqa_acc_k2_random": 1.0}
    assert not k0.update_called                              # reset: the next epoch starts empty
    owner.logged.clear()
    store.log_and_reset()
    assert owner.logged == {}


def test_metrics_stay_out_of_the_checkpoint_and_parameters_and_follow_device_moves():
    owner, fresh = Owner(), Owner()
    judge = SceneClassifier(image_size=16).eval()
    images, scenes = render_batch("val", range(2), 16)         # (2,3,16,16) in [0,1]
    fid = owner.metrics.metric("val", "fid", feature="scene", classifier=judge)   # holds a feature network
    fid.update(images, real=True)
    fid.update(images.flip(-1), real=False)
    owner.metrics.metric("val", "semantic", classifier=judge).update(images, scenes)
    owner.metrics.metric("val", "recon").update(images, images)
    assert list(owner.state_dict()) == list(fresh.state_dict()) == ["lin.weight", "lin.bias"]
    assert [n for n, _ in owner.named_parameters()] == ["lin.weight", "lin.bias"]
    fresh.load_state_dict(owner.state_dict(), strict=True)
    owner.load_state_dict(fresh.state_dict(), strict=True)
    semantic = owner.metrics["val", "semantic"]
    owner.to(torch.bfloat16)                                  # dtypes stay the metrics' own
    assert owner.lin.weight.dtype == torch.bfloat16 and semantic.objects.dtype == torch.float64
    owner.to("meta")                                          # devices follow the system
    assert semantic.device.type == "meta" and semantic.objects.device.type == "meta"
    assert fid.real_features_sum.device.type == "meta"
    assert owner.metrics["val", "recon"]["psnr"].device.type == "meta"


def test_both_judged_metrics_share_one_judge_base():
    from emu_lightning.metrics.edit import EditAccuracy
    from emu_lightning.metrics.semantic import SemanticAccuracy

    judge = SceneClassifier(image_size=16)
    for cls in (SemanticAccuracy, EditAccuracy):
        metric = cls(judge)
        assert isinstance(metric, JudgedMetric) and metric.STATES and not list(metric.parameters())
        assert all(getattr(metric, s).dtype == torch.float64 for s in metric.STATES)
    assert {METRICS[n].make for n in ("t2i", "semantic", "edit")} == {SemanticAccuracy, EditAccuracy}
