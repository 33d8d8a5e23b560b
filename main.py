"""Entry point: `python main.py fit --config recipes/debug/stage1_cformer.yaml` (also validate/test/predict)."""
import sys

from emu_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main())
