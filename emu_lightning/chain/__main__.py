"""`python -m emu_lightning.chain <chain.yaml> --out DIR`: see `emu_lightning.chain.run`."""
from emu_lightning.chain.run import main

if __name__ == "__main__":
    raise SystemExit(main())
