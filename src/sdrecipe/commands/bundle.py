"""`sdrecipe bundle create`: an offline bundle (bundle/) for nodes without network, what
it holds, and how to carry it there."""

from __future__ import annotations

import shlex
from pathlib import Path

from ..bundle.create import create_bundle
from ..console import out
from ..files import human_size

SECTIONS = (("source", "the upstream source"), ("artifacts", "model files"),
            ("packages", "environment files"), ("engine", "the engine and its wheels"),
            ("project", "recipe, patches, env specs and locks"))


def create(recipe, deployment, config, bundle: Path, profiles=None, smoke: bool = False,
           with_optional: bool = False, format: str = "dir", source: str | None = None) -> int:
    """`profiles`: the recipe's profiles to serve (None: all); `format`: dir or tar."""
    written = create_bundle(recipe, deployment, bundle, config, profiles, with_optional, smoke,
                            format, source)
    served = ", ".join(profiles or recipe.profiles) + (" (smoke)" if smoke else "")
    out(f"bundle: wrote {written.path}: {human_size(written.size)} in "
        f"{written.reused + written.rewritten} files, for {served}")
    for section, what in SECTIONS:
        files, size = written.sections.get(section, (0, 0))
        out(f"  {what:<38} {files:>6} files {human_size(size):>10}")
    if format == "dir":
        out(f"  {written.rewritten} files written, {written.reused} unchanged kept as they were "
            "(rsync sends only the new ones)")
    where = shlex.quote(f"{written.path}/")  # the folder's contents into PATH, not PATH/<name>
    profile = (profiles or [None])[0]
    options = (f" --profile {profile}" if profile else "") + (" --smoke" if smoke else "")
    copy = f"rsync -a --partial {where} host:PATH/" if format == "dir" else \
        f"rsync --partial {shlex.quote(str(written.path))} host:PATH"
    out(f"next: copy it to the cluster ({copy}); there, with no network: "
        + (f"PATH/scripts/deploy.sh --deploy-dir DIR --from-bundle PATH{options}" if format == "dir"
           else f"mkdir B && tar -xf PATH -C B (a folder bundle), then B/scripts/deploy.sh "
                f"--deploy-dir DIR --from-bundle B{options}"))
    return 0
