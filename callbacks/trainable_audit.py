"""At fit start: a row per part (trainable / frozen parameter counts, dtype), logged, and checked against
the system's `policy` — a part the policy trains with nothing trainable, or a frozen part with trainable
parameters, or a trainable parameter outside every part, stops the run before the first step.
"""
from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


def audit_rows(pl_module: L.LightningModule) -> list[tuple[str, int, int, str, str]]:
    """(part, trainable count, frozen count, dtypes, policy verdict) for each of the system's parts."""
    rows = []
    for name, part in pl_module.parts.items():
        params = list(part.parameters())
        n_train = sum(p.numel() for p in params if p.requires_grad)
        n_frozen = sum(p.numel() for p in params if not p.requires_grad)
        dtypes = ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in params})) or "-"
        rows.append((name, n_train, n_frozen, dtypes, "train" if name in pl_module.policy.trainable else "frozen"))
    return rows


class TrainableAudit(L.Callback):
    """Logs and enforces what each part of the system trains."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = audit_rows(pl_module)
        lines = [f"{'part':<18}{'trainable':>14}{'frozen':>14}  dtype      policy"]
        lines += [f"{n:<18}{t:>14,}{f:>14,}  {d:<10} {v}" for n, t, f, d, v in rows]
        table = "\n".join(lines)
        rank_zero_info("Trainable-parameter audit:\n" + table)
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("audit/trainable", "```\n" + table + "\n```", 0)
        errors = [f"policy trains '{n}' but it has no trainable parameters" for n, t, _, _, v in rows
                  if v == "train" and t == 0]
        errors += [f"policy freezes '{n}' but {t:,} of its parameters are trainable" for n, t, _, _, v in rows
                   if v == "frozen" and t > 0]
        in_parts = {id(p) for part in pl_module.parts.values() for p in part.parameters()}
        errors += [f"trainable parameter '{n}' belongs to no part of the policy"
                   for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in in_parts]
        if errors:
            raise RuntimeError("trainable-parameter audit failed:\n  " + "\n  ".join(errors))
