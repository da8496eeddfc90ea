"""`python -m sdrecipe` runs the CLI (which turns a missing dependency into the install
command, not a traceback: cli.py itself imports only the standard library)."""

from .cli import main

raise SystemExit(main())
