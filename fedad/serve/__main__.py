"""`python -m fedad.serve`: the command line of :mod:`fedad.serve.cli`."""

from fedad.serve.cli import main

main()
