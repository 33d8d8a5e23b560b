"""The NaN / Inf guard every stage shares: a non-finite loss or gradient skips its step and is counted; more
than `max_bad_steps` of them within `window` optimizer steps stops the run with a message naming the step, what
was non-finite and the loss terms of that step.

Plain bookkeeping (no Lightning): `PartsSystem` decides finiteness on every rank together and calls `record`.
Its state goes into checkpoints, so a resumed run keeps counting where it stopped.
"""
from __future__ import annotations

from torch import Tensor


class NonFiniteGuard:
    """Counts skipped steps and raises once too many fall in a window.

    Args:
        max_bad_steps: skipped steps tolerated within `window`; one more stops the run.
        window: width of the window in optimizer steps; None counts over the whole run.
    """

    def __init__(self, max_bad_steps: int = 10, window: int | None = 1000):
        if max_bad_steps < 0 or (window is not None and window < 1):
            raise ValueError(f"max_bad_steps={max_bad_steps} must be >= 0 and bad_step_window={window} >= 1 or None")
        self.max_bad_steps, self.window = max_bad_steps, window
        self.total = 0                 # steps skipped over the run
        self.steps: list[int] = []     # global steps of the skips still inside the window

    def record(self, step: int, what: str, terms: dict[str, Tensor | float], detail: str = "") -> str:
        """Count a skip at `step`; returns the warning line, or raises past the limit.

        Raises:
            RuntimeError: more than `max_bad_steps` skips within the window; names the step, `what` was
                non-finite, the loss terms and `detail` (e.g. the parameters with non-finite gradients).
        """
        self.total += 1
        self.steps = [s for s in self.steps if self.window is None or s > step - self.window] + [step]
        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items()) or "none computed"
        line = f"step {step}: non-finite {what} (loss terms: {shown}){detail}; the step is skipped"
        span = "over the run" if self.window is None else f"in the last {self.window} steps"
        if len(self.steps) > self.max_bad_steps:
            raise RuntimeError(f"{line}. {len(self.steps)} non-finite steps {span} (steps {self.steps[-5:]}), more "
                               f"than max_bad_steps={self.max_bad_steps}: lower the learning rate or check the inputs")
        return f"{line} ({len(self.steps)} {span}, {self.total} in all; the run stops past {self.max_bad_steps})"

    def state_dict(self) -> dict:
        return {"total": self.total, "steps": list(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.steps = int(state["total"]), [int(s) for s in state["steps"]]
