"""Visual generation heads (docs/generation_heads.md): one recipe line picks how images are generated."""
from components.heads.autoregressive import AutoregressiveHead
from components.heads.base import ProjectionHead, VisualHead
from components.heads.flow import FlowSampler
from components.heads.queries import QueryHead

__all__ = ["AutoregressiveHead", "FlowSampler", "ProjectionHead", "QueryHead", "VisualHead"]
