"""`python -m tasks.evaluate`: the stage on its own (see tasks/evaluate/__init__.py)."""

from tasks.evaluate import main

main()
