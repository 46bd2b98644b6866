"""`python -m app.cli`: the `kdistill` command line."""

from app.cli import main

main()
