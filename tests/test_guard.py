"""The NaN / Inf guard shared by every stage (`PartsSystem`, `guard.py`): a non-finite loss or gradient skips its
step (no parameter or optimizer state moves) and is counted; past `max_bad_steps` within `bad_step_window`
steps the run stops with a message naming the step, what was non-finite and the loss terms."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from emu_lightning.checkpoints.io import safe_load
from emu_lightning.cli import cli_main
from emu_lightning.systems.guard import NonFiniteGuard
from tests.helpers import tiny_stage1
from tests.resume_helpers import args, overlay

pytestmark = pytest.mark.usefixtures("one_thread")


class Poison(L.Callback):
    """At the given global steps, make the loss (NaN pixels) or only the gradients (a hook on one LLM weight)
    non-finite; records per step whether any trainable weight moved."""

    def __init__(self, loss_at: list[int] = (), grad_at: list[int] = ()):
        self.loss_at, self.grad_at, self.moved, self.hook = set(loss_at), set(grad_at), {}, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        step = trainer.global_step
        self.before = [p.detach().clone() for p in module.parameters() if p.requires_grad]
        if step in self.loss_at:
            batch["pixel_values"][0] = float("nan")
        if step in self.grad_at:
            weight = next(p for n, p in module.named_parameters() if n.endswith("layers.0.mlp.down_proj.weight"))
            self.hook = weight.register_hook(lambda g: torch.full_like(g, float("inf")))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        after = [p for p in module.parameters() if p.requires_grad]
        self.moved[trainer.global_step - 1] = any(not torch.equal(a, b) for a, b in zip(self.before, after))
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


def _poisoned_run(tmp_path, steps: int, loss_at=(), grad_at=(), **model):
    poison = {"class_path": "tests.test_guard.Poison",
              "init_args": {"loss_at": list(loss_at), "grad_at": list(grad_at)}}
    return cli_main(args(overlay(tmp_path, steps, every=100, callbacks=[poison], model=model)))


def test_a_nan_loss_and_an_inf_gradient_skip_their_steps_and_are_counted(tmp_path):
    cli = _poisoned_run(tmp_path, 5, loss_at=[1], grad_at=[3], max_bad_steps=2)
    poison = next(c for c in cli.trainer.callbacks if isinstance(c, Poison))
    assert poison.moved == {0: True, 1: False, 2: True, 3: False, 4: True}, poison.moved
    model = cli.model
    assert cli.trainer.global_step == 5 and model.bad_steps == 2 and model.guard.steps == [1, 3]
    assert float(cli.trainer.callback_metrics["train/bad_steps"]) == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The optimizer state of a skipped step did not advance either (AdamW counts 3 real steps of 5).
    state = cli.trainer.optimizers[0].state
    assert {int(s["step"]) for s in state.values()} == {3}
    saved = safe_load(tmp_path / "run" / "ckpt" / "last.ckpt")["emu_state"]["guard"]
    assert saved == {"total": 2, "steps": [1, 3]}     # a resumed run keeps counting


def test_too_many_non_finite_steps_in_the_window_stop_the_run_naming_step_and_terms(tmp_path):
    with pytest.raises(RuntimeError) as err:
        _poisoned_run(tmp_path, 6, loss_at=[0, 2, 3], max_bad_steps=2, bad_step_window=5)
    msg = str(err.value)
    assert msg.startswith("step 3: non-finite loss (loss terms: text_loss=nan, regression_loss=nan"), msg
    assert "3 non-finite steps in the last 5 steps (steps [0, 2, 3]), more than max_bad_steps=2" in msg, msg


def test_gradient_message_names_the_parameters(tmp_path):
    with pytest.raises(RuntimeError, match=r"step 0: non-finite gradient \(loss terms: text_loss=\d.*non-finite "
                                           r"gradients in 1 tensors: \['llm\.[\w.]*layers\.0\.mlp\.down_proj"):
        _poisoned_run(tmp_path, 2, grad_at=[0], max_bad_steps=0)


def test_window_forgets_old_skips():
    guard = NonFiniteGuard(max_bad_steps=1, window=10)
    guard.record(0, "loss", {"loss": float("nan")})
    guard.record(10, "loss", {"loss": float("nan")})          # step 0 left the window (steps 1..10)
    assert guard.steps == [10] and guard.total == 2
    with pytest.raises(RuntimeError, match=r"step 12: non-finite gradient \(loss terms: loss=1\).*2 non-finite steps "
                                           r"in the last 10 steps \(steps \[10, 12\]\)"):
        guard.record(12, "gradient", {"loss": 1.0})
    whole_run = NonFiniteGuard(max_bad_steps=1, window=None)
    whole_run.record(0, "loss", {})
    with pytest.raises(RuntimeError, match="2 non-finite steps over the run"):
        whole_run.record(10**6, "loss", {})
    with pytest.raises(ValueError, match="bad_step_window=0"):
        NonFiniteGuard(1, 0)


def test_stage1_shares_the_guard():
    system = tiny_stage1(max_bad_steps=0)
    from tests.test_stage1 import _batch  # noqa: PLC0415  (the stage-1 tests' synthetic batch)

    batch = _batch(system)
    assert torch.is_tensor(system.training_step(batch, 0))
    batch["pixel_values"][0] = float("nan")
    with pytest.raises(RuntimeError, match=r"step 0: non-finite loss \(loss terms: text_loss=nan, loss=nan\)"):
        system.training_step(batch, 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 3.0e38, None], ids=str)
def test_fast_gradient_check_agrees_with_the_elementwise_one(bad):
    # `grads_finite` decides from the total norm first; 3e38 is finite but its square overflows the norm, which
    # must fall back to the elementwise test and still read finite.
    from emu_lightning.systems.base import grads_finite

    grads = [torch.randn(5, 7), torch.randn(11), torch.randn(3, 2, 2).to(torch.float64)]
    if bad is not None:
        grads[1][4] = bad
    elementwise = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    assert grads_finite(grads) == elementwise == (bad is None or bad == 3.0e38)
