"""`python -m tasks.serve`: the stage on its own (see tasks/serve/__init__.py)."""

from tasks.serve import main

main()
