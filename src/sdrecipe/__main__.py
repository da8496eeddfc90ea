"""`python -m sdrecipe` runs the CLI; a missing dependency gets the install command, not a traceback."""

import sys
from pathlib import Path

try:
    from .cli import main
except ModuleNotFoundError as exc:
    if exc.name and exc.name.split(".")[0] == "sdrecipe":
        raise
    project = Path(__file__).resolve().parents[2]
    print(f"sdrecipe: error: {exc}: its dependencies are missing for {sys.executable}; "
          f"run: {sys.executable} -m pip install -e '{project}'", file=sys.stderr)
    raise SystemExit(2)

raise SystemExit(main())
