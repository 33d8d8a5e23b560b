"""Released Emu / Emu2 checkpoints → this platform's parts and recipes, and back (docs/design.md §8).

`python -m emu_lightning.checkpoints.convert emu1|emu2 SRC DST --tokenizer TOK` writes DST (see `folder.py`); `export`
writes a converted or fine-tuned model back in the released key layout.
"""
from emu_lightning.checkpoints.convert.common import ConversionError
from emu_lightning.checkpoints.convert.emu1 import convert_emu1, export_emu1
from emu_lightning.checkpoints.convert.emu2 import convert_emu2, export_emu2

__all__ = ["ConversionError", "convert_emu1", "convert_emu2", "export_emu1", "export_emu2"]
