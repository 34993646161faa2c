"""`python -m tasks.data`: the stage on its own (see tasks/data/__init__.py)."""

from tasks.data import main

main()
