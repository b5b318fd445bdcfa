"""`python -m dit_fast.eval A.npz B.npz`: the FID command line (dit_fast.eval.fid)."""
import sys

from .fid import main

if __name__ == "__main__":
    sys.exit(main())
