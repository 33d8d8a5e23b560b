"""Entry point: `python main.py fit --config recipes/debug/stage1_cformer.yaml` (also validate/test/predict)."""
from emu_lightning.cli import cli_main

if __name__ == "__main__":
    cli_main()
