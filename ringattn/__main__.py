"""`python -m ringattn [--json]`: the environment report to paste into a bug report (ringattn.env_report)."""

import sys

from .env_report import main

if __name__ == "__main__":
    sys.exit(main())
