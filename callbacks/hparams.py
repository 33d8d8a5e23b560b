"""The resolved run config in TensorBoard: LightningCLI's `config.yaml` in the log dir, plus the YAML in the
TEXT tab (`config`) and every scalar leaf (`model.init_args.policy.lr.llm`, ...) in the HPARAMS tab, so the
runs of a sweep line up side by side against their metrics. No experiment summary is written: TensorBoard then
offers every scalar tag of the runs as a metric column. Used by EmuCLI as its `save_config_callback`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams


def flatten_config(node: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config → {dotted key: scalar}; lists and None become strings (TensorBoard takes scalars only)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten_config(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(node, (bool, int, float, str)):
        return {prefix: node}
    return {prefix: str(node) if not isinstance(node, list) else yaml.safe_dump(node, default_flow_style=True).strip()}


class ConfigToTensorBoard(SaveConfigCallback):
    """`SaveConfigCallback` (rank zero, once per run) that also logs the resolved config to TensorBoard."""

    _log_dir: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # `trainer.log_dir` broadcasts rank 0's directory: read it here, on every rank, never in `save_config`
        # (rank 0 only), where the lone broadcast paired with the other ranks' next collective and hung the run.
        self._log_dir = trainer.log_dir
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The config exactly as saved to disk: the file `setup` just wrote, read back (a second dump of the whole
        # config would cost about a second of jsonargparse per run), or dumped when the file was not written.
        saved = Path(self._log_dir or "", self.config_filename)
        if self.save_to_log_dir and not self.multifile and saved.is_file():
            text = saved.read_text()
        else:
            text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                exp = logger.experiment
                exp.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)  # code block
                _, session_start, _ = hparams(flatten_config(yaml.safe_load(text)), {})
                exp._get_file_writer().add_summary(session_start)
                exp.flush()
