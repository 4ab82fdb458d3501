"""``python -m agent`` is the ``strnet`` command."""

from agent.cli import main

main()
