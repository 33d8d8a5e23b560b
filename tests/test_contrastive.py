"""Stage 0 (CLIP-style encoder pretraining): the loss, the text tower's mask, one step of the system, the retrieval
metric, and stage 1 starting from the stage-0 encoder (exactly its weights, nothing else)."""
from __future__ import annotations

import math

import pytest
import torch

from components.contrastive import PooledImageHead, TextTower
from components.losses.contrastive import contrastive_logits, info_nce
from emu_lightning.data.layout.collate import CaptionCollator
from emu_lightning.data.modules.captions import image_transform
from emu_lightning.data.synthetic.scenes import SyntheticCaptions
from emu_lightning.metrics.retrieval import RetrievalAccuracy
from emu_lightning.systems.contrastive import ContrastiveSystem
from emu_lightning.systems.policy import StagePolicy
from tests.helpers import IMAGE_SIZE, tiny_encoder, tiny_stage1

pytestmark = pytest.mark.usefixtures("one_thread")
PARTS = ["encoder", "image_head", "text", "logit_scale"]


def tiny_stage0(**kwargs) -> ContrastiveSystem:
    policy = StagePolicy(trainable=PARTS, lr=dict.fromkeys(PARTS, 1e-3))
    text = TextTower(vocab_size=1024, width=32, depth=1, num_heads=2, max_length=64, out_dim=16)
    return ContrastiveSystem(tiny_encoder(), PooledImageHead(64, 16), text, policy=policy, **kwargs)


def caption_batch(system: ContrastiveSystem, n: int = 6) -> dict:
    ds, tf = SyntheticCaptions(split="train", size=n, image_size=IMAGE_SIZE), image_transform(IMAGE_SIZE)
    samples = [{**s, "image": tf(s["image"]), "caption": s["captions"][0]} for s in (ds[i] for i in range(n))]
    return CaptionCollator(system.tokenizer, system.num_image_tokens, max_length=48)(samples)


def test_info_nce_is_symmetric_and_low_on_matched_pairs():
    x = torch.randn(8, 16)
    matched = info_nce(contrastive_logits(x, x, torch.tensor(math.log(100.0))))["contrastive_loss"]
    shuffled = info_nce(contrastive_logits(x, x.roll(1, 0), torch.tensor(math.log(100.0))))["contrastive_loss"]
    assert matched < 0.1 < math.log(8) < shuffled
    a, b = torch.randn(5, 16), torch.randn(5, 16)
    scale = torch.tensor(2.0)
    assert torch.allclose(info_nce(contrastive_logits(a, b, scale))["contrastive_loss"],
                          info_nce(contrastive_logits(b, a, scale))["contrastive_loss"])
    # the scale is clamped at 100 (CLIP): a larger log-scale gives the same logits
    assert torch.equal(contrastive_logits(a, b, torch.tensor(9.0)), contrastive_logits(a, b, torch.tensor(5.0)))


def test_retrieval_accuracy_counts_the_diagonal():
    metric = RetrievalAccuracy()
    logits = torch.eye(4)
    logits[0, 1] = 2.0          # image 0 prefers caption 1; caption 1 prefers image 0
    metric.update(logits)
    out = metric.compute()
    assert out["i2t"] == 0.75 and out["t2i"] == 0.75
    with pytest.raises(ValueError, match="square"):
        metric.update(torch.zeros(2, 3))


def test_text_tower_reads_only_masked_tokens():
    tower = TextTower(vocab_size=50, width=32, depth=1, num_heads=2, max_length=8, out_dim=16).eval()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    other = ids.clone()
    other[:, :2] = 7                                  # change only unmasked positions
    assert torch.allclose(tower(ids, mask), tower(other, mask), atol=1e-6)
    with pytest.raises(ValueError, match="1 of 2 sequences have no token"):
        tower(ids, torch.tensor([[0] * 6, [1] * 6]))
    with pytest.raises(ValueError, match="max_length=8"):
        tower(torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 9))


def test_widths_are_checked():
    text = TextTower(vocab_size=1024, width=32, depth=1, num_heads=2, out_dim=16)
    with pytest.raises(ValueError, match="image_head.in_dim=32"):
        ContrastiveSystem(tiny_encoder(), PooledImageHead(32, 16), text)
    with pytest.raises(ValueError, match="text.out_dim=16"):
        ContrastiveSystem(tiny_encoder(), PooledImageHead(64, 8), text)
    with pytest.raises(ValueError, match="text.vocab_size=100"):
        ContrastiveSystem(tiny_encoder(), PooledImageHead(64, 16),
                          TextTower(vocab_size=100, width=32, depth=1, num_heads=2, out_dim=16))


def test_one_step_trains_every_part():
    system = tiny_stage0()
    batch = caption_batch(system)
    assert (batch["labels"] != -100).sum(1).min() > 1      # every caption has tokens for the text tower
    logits = system(batch)
    assert logits.shape == (6, 6)
    loss = info_nce(logits)["contrastive_loss"]
    assert torch.isfinite(loss)
    loss.backward()
    for name, part in system.parts.items():
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
    assert system.logit_scale.value.grad.abs() > 0
    groups = {g["name"] for g in system.policy.param_groups(system.parts)}
    assert groups == {"encoder", "encoder.no_decay", "image_head", "image_head.no_decay", "text", "text.no_decay",
                      "logit_scale.no_decay"}


def test_stage1_takes_exactly_the_stage0_encoder(tmp_path):
    stage0 = tiny_stage0()
    with torch.no_grad():
        for p in stage0.encoder.parameters():
            p.add_(torch.randn_like(p))            # weights no fresh encoder could have
    path = tmp_path / "stage0.ckpt"
    torch.save({"state_dict": stage0.state_dict()}, path)

    stage1 = tiny_stage1(init_from=str(path))
    adapter = {k: v.clone() for k, v in stage1.adapter.state_dict().items()}
    llm = {k: v.clone() for k, v in stage1.llm.state_dict().items()}
    stage1.setup("fit")
    assert stage1.handoff_report.loaded == {"encoder": len(stage0.encoder.state_dict())}
    assert sorted(stage1.handoff_report.fresh) == ["adapter", "llm"]
    for k, v in stage0.encoder.state_dict().items():
        assert torch.equal(stage1.encoder.state_dict()[k], v), k
    assert all(torch.equal(stage1.adapter.state_dict()[k], v) for k, v in adapter.items())
    assert all(torch.equal(stage1.llm.state_dict()[k], v) for k, v in llm.items())


def test_stage1_handoff_from_stage0_names_missing_parts(tmp_path):
    path = tmp_path / "stage0.ckpt"
    torch.save({"state_dict": tiny_stage0().state_dict()}, path)
    stage1 = tiny_stage1(init_from=str(path), handoff={"encoder": "encoder", "adapter": "adapter"})
    with pytest.raises(ValueError, match=r"no keys under \['adapter'\]"):
        stage1.setup("fit")


def test_fit_logs_retrieval_and_saves_a_handoff_checkpoint(tmp_path):
    import lightning as L

    from tests.helpers import tiny_datamodule

    system = tiny_stage0()
    trainer = L.Trainer(max_steps=3, val_check_interval=3, limit_val_batches=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(system, datamodule=tiny_datamodule(system))
    metrics = trainer.callback_metrics
    assert {"val/contrastive_loss", "val/i2t_acc", "val/t2i_acc", "heldout/i2t_acc"} <= set(metrics)
    path = tmp_path / "stage0.pt"     # a plain state dict (a recipe's checkpoint: test_recipes / the benchmark)
    torch.save(system.state_dict(), path)
    stage1 = tiny_stage1(init_from=str(path))
    stage1.setup("fit")
    assert all(torch.equal(stage1.encoder.state_dict()[k], v) for k, v in system.encoder.state_dict().items())


def test_shape_swapped_twin_differs_in_one_shape_only():
    import random

    from emu_lightning.data.synthetic.negatives import shape_swapped
    from emu_lightning.data.synthetic.text import HELDOUT_PAIRS

    ds, rng = SyntheticCaptions(split="train", size=20, image_size=IMAGE_SIZE), random.Random(0)
    for i in range(20):
        scene = ds[i]["scene"]
        twin = shape_swapped(scene, rng)
        diff = [(a, b) for a, b in zip(scene.objects, twin.objects) if a != b]
        assert len(diff) == 1 and len(twin.objects) == len(scene.objects)
        (a, b), = diff
        assert a.shape != b.shape and (a.color, a.size, a.position) == (b.color, b.size, b.position)
        assert (b.color, b.shape) not in HELDOUT_PAIRS


def test_shape_negatives_add_columns_laid_out_like_the_captions():
    system = tiny_stage0(shape_negatives=True)
    batch = caption_batch(system)
    ids, mask = system.negatives(batch["scenes"], seed=0)
    assert torch.equal(ids[:, :3], batch["input_ids"][:, :3])      # <s>[IMG][/IMG], never in the mask
    assert mask[:, :3].sum() == 0 and (mask.sum(1) > 1).all()
    logits = system(batch, (ids, mask))
    assert logits.shape == (6, 12)
    loss = info_nce(logits)["contrastive_loss"]
    assert torch.isfinite(loss) and loss > info_nce(logits[:, :6])["contrastive_loss"]   # more captions to beat
