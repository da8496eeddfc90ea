"""`sdrecipe env build` and `sdrecipe env check`: the env stage on its own, and the offline
import check in the built environment."""

from __future__ import annotations

from ..console import err, out
from ..deploy_lock import deployment_lock
from ..environment.location import usage
from ..stages import env as env_stage


def show_check(target, result) -> int:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"import check: {target.profile} (Python {result.python}, offline)")
    for column in ("", "module", "version", "detail"):
        table.add_column(column, overflow="fold")
    for row in result.rows:
        mark = "[green]ok[/green]" if row["ok"] else "[red]FAIL[/red]"
        table.add_row(mark, row["name"], row["version"], row["detail"])
    Console().print(table)
    out(usage(target.deployment, target.profile))
    if not result.ok:
        err(f"import check failed for: {result.failed}; for the fix, run: "
            f"{target.command('doctor')}")
        return 1
    return 0


def build(target, force: bool = False) -> int:
    with deployment_lock(target.deployment, "sdrecipe env build"):
        built = env_stage.run(target, force=force)
    err(f"sdrecipe: {built.summary}")
    data = env_stage.record(target).complete()
    last = data.get("check") or {}
    if not built.changed and last.get("ok") and last.get("build_id") == data["outputs"]["build_id"]:
        out(f"import check passed after the last build (rerun: {target.command('env check')})\n"
            + usage(target.deployment, target.profile))
        return 0
    return show_check(target, env_stage.check(target))


def check(target) -> int:
    return show_check(target, env_stage.check(target))
