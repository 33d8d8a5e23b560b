"""Visual encoders (VisualEncoder protocol)."""
from components.encoders.eva import EVAEncoder

__all__ = ["EVAEncoder"]
