"""`python -m tasks.merge`: the stage on its own (see tasks/merge/__init__.py)."""

from tasks.merge import main

main()
