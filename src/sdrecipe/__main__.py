"""`python -m sdrecipe` runs the CLI."""

from .cli import main

raise SystemExit(main())
