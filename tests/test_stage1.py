"""Stage-1 system: one step, what trains, parameter-group lrs, frozen parts, decoding, the audit."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from callbacks.trainable_audit import TrainableAudit, audit_rows
from emu_lightning.systems.policy import StagePolicy
from tests.helpers import tiny_datamodule, tiny_stage1


def _batch(system, n=4):
    dm = tiny_datamodule(system, batch_size=n)
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("adapter", ["cformer", "meanpool"])
def test_training_step_updates_every_trainable_part(adapter):
    system = tiny_stage1(adapter)
    batch = _batch(system)
    before = {n: p.detach().clone() for n, p in system.encoder.named_parameters()}
    loss = system.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, part in system.parts.items():
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), name
    opt = torch.optim.SGD(system.parameters(), lr=0.1)
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in system.encoder.named_parameters())


def test_vocab_resized_to_tokenizer():
    system = tiny_stage1()
    assert system.llm.vocab_size == len(system.tokenizer)


def test_frozen_encoder_gets_no_grad_and_stays_in_eval():
    system = tiny_stage1(trainable=("adapter", "llm"))
    assert not system.encoder.training  # the policy puts frozen parts in eval at construction
    system.train()
    assert not system.encoder.training and system.adapter.training
    assert not any(p.requires_grad for p in system.encoder.parameters())
    system.training_step(_batch(system), 0).backward()
    assert all(p.grad is None for p in system.encoder.parameters())
    assert all(p.grad is not None for p in system.adapter.parameters())


def test_param_groups_carry_per_part_lr_and_no_decay_for_vectors():
    policy = StagePolicy(trainable=["encoder", "adapter", "llm"], lr={"encoder": 1e-5, "adapter": 2e-4, "llm": 3e-5},
                         weight_decay=0.1)
    system = tiny_stage1()
    groups = policy.param_groups(system.parts)
    by_name = {g["name"]: g for g in groups}
    assert by_name["encoder"]["lr"] == 1e-5 and by_name["adapter"]["lr"] == 2e-4 and by_name["llm"]["lr"] == 3e-5
    assert by_name["llm"]["weight_decay"] == 0.1 and by_name["llm.no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim < 2 for p in by_name["llm.no_decay"]["params"])
    n_grouped = sum(p.numel() for g in groups for p in g["params"])
    assert n_grouped == sum(p.numel() for p in system.parameters() if p.requires_grad)


@pytest.mark.parametrize("policy, match", [
    (dict(trainable=["vision"], lr={"vision": 1.0}), "policy.trainable names"),
    (dict(trainable=["llm"], lr={}), "no learning rate for trainable parts \\['llm'\\]"),
    (dict(trainable=["llm"], lr={"llm": 1.0, "encoder": 1.0}), "which policy.trainable freezes"),
])
def test_bad_policy_is_named(policy, match):
    with pytest.raises(ValueError, match=match):
        StagePolicy(**policy).check(tiny_stage1().parts)


def test_audit_counts_and_catches_policy_drift():
    system = tiny_stage1(trainable=("adapter", "llm"))
    rows = {r[0]: r for r in audit_rows(system)}
    n_enc = sum(p.numel() for p in system.encoder.parameters())
    assert rows["encoder"][1:3] == (0, n_enc) and rows["encoder"][4] == "frozen"
    assert rows["llm"][1] == sum(p.numel() for p in system.llm.parameters())
    system.encoder.requires_grad_(True)  # training now disagrees with the policy
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="policy freezes 'encoder'"):
        TrainableAudit().on_fit_start(trainer, system)


@pytest.mark.parametrize("beams", [1, 2])
def test_caption_decodes_strings(beams):
    system = tiny_stage1(max_new_tokens=5).eval()
    batch = _batch(system, n=2)
    caps = system.caption(batch["pixel_values"], batch["prompt_ids"], num_beams=beams)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)


def test_image_count_mismatch_raises_with_counts():
    system = tiny_stage1()
    batch = _batch(system, n=3)
    with pytest.raises(ValueError, match="2 images"):
        system(batch["input_ids"], batch["attention_mask"], batch["pixel_values"][:2])


def test_component_frozen_by_its_own_flag_is_not_unfrozen_by_the_policy():
    system = tiny_stage1()
    system.encoder.freeze()
    system.policy.apply(system.parts)
    assert not any(p.requires_grad for p in system.encoder.parameters())
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="policy trains 'encoder' but it has no trainable parameters"):
        TrainableAudit().on_fit_start(trainer, system)


def test_greedy_caption_equals_full_forward_argmax_loop():
    """HF generate (KV cache) inside `caption` picks, step by step, the argmax of a full no-cache forward."""
    system = tiny_stage1(max_new_tokens=6).eval()
    batch = _batch(system, n=2)
    ids = system.ids
    cached = system.caption(batch["pixel_values"], batch["prompt_ids"], num_beams=1)
    seq = batch["prompt_ids"]
    with torch.no_grad():
        for _ in range(6):
            logits = system(seq, torch.ones_like(seq), batch["pixel_values"])
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    manual = []
    for row in seq[:, batch["prompt_ids"].shape[1]:].tolist():
        row = row[: row.index(ids.eos)] if ids.eos in row else row
        manual.append(system.tokenizer.decode(row, skip_special_tokens=True).strip())
    assert cached == manual


def test_frozen_part_stays_in_eval_through_fit_and_validation():
    from tests.helpers import tiny_datamodule

    system = tiny_stage1(trainable=("adapter", "llm"), max_new_tokens=2, num_beams=1)
    modes = []

    class Check(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            modes.append((module.encoder.training, module.adapter.training))

    trainer = L.Trainer(max_steps=4, val_check_interval=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Check()])
    trainer.fit(system, datamodule=tiny_datamodule(system, train_size=16, eval_size=4, batch_size=4))
    assert modes == [(False, True)] * 4
