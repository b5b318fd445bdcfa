"""`python -m dit_fast.train ...` (also `torchrun --nproc_per_node N -m dit_fast.train ...`)."""
import sys

from .trainer import main

if __name__ == "__main__":
    sys.exit(main())
