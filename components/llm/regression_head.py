"""Regression head: LLM hidden state -> visual embedding space (docs/design.md §1, §8).

Emu1 `stu_regress_head` Linear(5120→5120) and Emu2 `project_down` Linear(6656→1792), both without bias,
applied to the last hidden state after the final RMSNorm. `RegressionHead` is the papers' autoregressive
generation head (`components.heads.AutoregressiveHead`); other heads live in `components/heads/`.
"""
from components.heads.autoregressive import AutoregressiveHead as RegressionHead

__all__ = ["RegressionHead"]
