"""`gallery.html`: one self-contained page with every image of a prompt batch.

After a batch, a person wants to see the images next to their prompts, not walk
through folders. The page embeds the PNGs as data URIs (it can be copied off the
cluster as one file) and lists prompts that are not done yet, so a partial batch
says what a resubmission would still make.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from .batch import PromptEntry, load_sidecar

GALLERY = "gallery.html"

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;background:#fafafa;color:#222}
h1{font-size:1.4em} .meta{color:#666;font-size:.85em}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:1em;margin:1em 0}
section.missing{border-style:dashed;color:#888}
.prompt{font-size:1.05em;margin:0 0 .5em} .images{display:flex;flex-wrap:wrap;gap:.5em}
.images img{width:256px;height:auto;border-radius:4px}
"""


def _figure(folder: Path, name: str) -> str:
    data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
    return f'<a href="{html.escape(folder.name)}/{html.escape(name)}"><img alt="{html.escape(name)}" ' \
           f'src="data:image/png;base64,{data}"></a>'


def _section(entry: PromptEntry, out: Path) -> tuple[str, bool]:
    folder = out / entry.folder
    sidecar = load_sidecar(folder)
    prompt = f'<p class="prompt">{html.escape(entry.prompt)}</p>'
    if sidecar is None:
        return (f'<section class="missing">{prompt}<p class="meta">line {entry.index}: not made yet '
                f'(resubmit the batch to finish it)</p></section>'), False
    timing, settings, job = (sidecar.get(key) or {} for key in ("timing", "settings", "job"))
    job_name = (f"{job.get('array_job')}_{job.get('array_task')}" if job.get("array_job")
                else job.get("id"))
    meta = (f"line {entry.index} · seed {sidecar.get('seed')} · {settings.get('sampler')} "
            f"{settings.get('steps')} steps · {settings.get('W')}×{settings.get('H')} · "
            f"scale {settings.get('scale')}"
            + (" · smoke: tiny random models" if settings.get("smoke") else "")
            + f" · {timing.get('total_s', '?')} s on {sidecar.get('node')} (job {job_name})")
    meta = html.escape(meta)
    images = "".join(_figure(folder, name) for name in sidecar["images"])
    return f'<section>{prompt}<p class="meta">{meta}</p><div class="images">{images}</div></section>', True


def write_gallery(entries: list[PromptEntry], out: Path, title: str) -> tuple[Path, int]:
    """Write `<out>/gallery.html`; returns it and how many prompts are done."""
    sections = [_section(entry, out) for entry in entries]
    done = sum(ok for _, ok in sections)
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<p class="meta">{done} of {len(entries)} prompts done</p>'
            + "".join(text for text, _ in sections) + "</body></html>\n")
    path = out / GALLERY
    partial = path.with_suffix(".html.partial")
    partial.write_text(page, encoding="utf-8")
    partial.replace(path)
    return path, done
