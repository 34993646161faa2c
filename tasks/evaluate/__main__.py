"""`python -m tasks.evaluate --spec FILE`: the stage on its own (see tasks/evaluate/__init__.py)."""

import sys

from tasks.evaluate import main

sys.exit(main())
