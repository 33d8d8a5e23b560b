"""`python -m emu_lightning.inference <task> ...`: see `emu_lightning.inference.infer`."""
from emu_lightning.inference.infer import main

if __name__ == "__main__":
    raise SystemExit(main())
