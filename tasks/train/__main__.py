"""`python -m tasks.train`: the stage on its own (see tasks/train/__init__.py)."""

import sys

from tasks.config import UserError
from tasks.train import main

try:
    main()
except UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
