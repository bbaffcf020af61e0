"""`python -m lucid.cli ...` = `lucid ...`."""

from lucid.cli import main

main()
