"""`python -m tasks.export`: the stage on its own (see tasks/export/__init__.py)."""

from tasks.export import main

main()
