"""``python -m modelcd`` runs the CLI."""

from modelcd.cli import main

main()
