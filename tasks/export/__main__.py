"""`python -m tasks.export --spec FILE`: the stage on its own (see tasks/export/__init__.py)."""

import sys

from tasks.export import main

sys.exit(main())
