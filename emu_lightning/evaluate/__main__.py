import sys

from emu_lightning.evaluate.cli import main

sys.exit(main())
