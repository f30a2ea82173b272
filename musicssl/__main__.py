"""`python -m musicssl ...` is the same as the `musicssl` command."""

from musicssl.cli import run

run()
