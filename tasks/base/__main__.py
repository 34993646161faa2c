"""`python -m tasks.base`: the stage on its own (see tasks/base/__init__.py)."""

import sys

from tasks.base import main
from tasks.config import UserError

try:
    main()
except UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
