"""`python -m tasks.promote`: the stage on its own (see tasks/promote/__init__.py)."""

from tasks.promote import main

main()
