"""Visual adapters (Adapter protocol): swap by class_path."""
from components.adapters.cformer import CFormer
from components.adapters.meanpool import MeanPoolProjector

__all__ = ["CFormer", "MeanPoolProjector"]
