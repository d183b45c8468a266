"""python -m htsat train|predict ... (torchrun --nproc_per_node N -m htsat train ... for DDP)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
