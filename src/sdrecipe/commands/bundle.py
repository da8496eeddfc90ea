"""`sdrecipe bundle create`: an offline bundle (bundle.py) for nodes without network, and
how to carry it there."""

from __future__ import annotations

from pathlib import Path

from ..bundle import MANIFEST, create_bundle
from ..console import out


def create(recipe, deployment, config, bundle: Path, profiles=None, with_optional: bool = False,
           wheels=(), format: str = "dir") -> int:
    """`profiles`: the recipe's profiles to serve (None: all); `format`: dir or tar."""
    written = create_bundle(recipe, deployment, bundle, config, profiles, with_optional, wheels,
                            format)
    manifest_note = "" if format == "tar" else f" (manifest: {written / MANIFEST})"
    out(f"bundle: wrote {written}{manifest_note}")
    out(f"next: copy it to the cluster (rsync -a --partial {written} host:PATH), then run "
        f"`sdrecipe fetch --from-bundle PATH` on the node without network")
    return 0
