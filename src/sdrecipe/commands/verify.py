"""`sdrecipe verify`: the verify stage on its own; the report's checks shown."""

from __future__ import annotations

from pathlib import Path

from ..console import err, out
from ..deploy_lock import deployment_lock
from ..stages import verify as verify_stage


def show_report(folder: Path) -> None:
    """Each check of the report in `folder`, and on failure the log's tail."""
    from ..environment.runtime import tail_lines
    from ..report import read
    data = read(folder)
    if data is None:
        return
    for check in data["checks"]:
        out(f"  {'ok  ' if check['ok'] else 'FAIL'}  {check['name']:<16} {check['message']}")
    out(f"verify: {'passed' if data['ok'] else 'FAILED'}; report: {folder / 'report.html'}")
    log = folder / "txt2img.log"
    if not data["ok"] and log.is_file():
        tail = tail_lines(log.read_text(encoding="utf-8", errors="replace"))
        err(f"--- last {len(tail)} lines of {log} ---")
        err("\n".join(tail))


def run(target, out_dir: str | None = None) -> int:
    folder = Path(out_dir).resolve() if out_dir else verify_stage.report_folder(target)
    out(f"verify: profile {target.profile}{' (smoke: tiny random models)' if target.smoke else ''}; "
        f"running txt2img in {target.deployment.root}")
    try:  # a report elsewhere needs no lock on a deployment nobody can write to
        with deployment_lock(target.deployment, "sdrecipe verify", read_only_ok=bool(out_dir)):
            verify_stage.run(target, out=folder if out_dir else None)
    finally:
        show_report(folder)
    return 0
