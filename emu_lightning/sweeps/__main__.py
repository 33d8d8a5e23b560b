"""`python -m emu_lightning.sweeps <sweep.yaml> ...`: see `emu_lightning.sweeps.runner`."""
from emu_lightning.sweeps.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
