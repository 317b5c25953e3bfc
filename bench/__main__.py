"""`python -m bench ...` from the repository root: the same as `python -m ringattn.bench ...`."""

import sys

from ringattn.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m bench"))
