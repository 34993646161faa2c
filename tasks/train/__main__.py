"""`python -m tasks.train --spec FILE`: the stage, or one training job (see tasks/train/__init__.py)."""

import sys

from tasks.train import main

sys.exit(main())
