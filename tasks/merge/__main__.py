"""`python -m tasks.merge --spec FILE`: the stage on its own (see tasks/merge/__init__.py)."""

import sys

from tasks.merge import main

sys.exit(main())
