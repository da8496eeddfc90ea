"""`gallery.html`: one self-contained page with every image of a prompt batch.

After a batch, a person wants to see the images next to their prompts, not walk
through folders. The page embeds thumbnails as data URIs (it opens offline and can
be copied off the cluster as one small file), each linking to its full-size PNG in
the prompt's folder beside the page, and lists prompts that are not done yet, so a
partial batch says what a resubmission would still make. It is rendered from
`templates/gallery.html` by the verify report's renderer.
"""

from __future__ import annotations

import html
from pathlib import Path

from .batch import PromptEntry, load_sidecar
from .files import atomic_write_text
from .report import render_template, thumbnail_data_uri

GALLERY = "gallery.html"


def _figure(folder: Path, name: str) -> str:
    return (f'<a href="{html.escape(folder.name)}/{html.escape(name)}">'
            f'<img alt="{html.escape(name)}" src="{thumbnail_data_uri(folder / name)}"></a>')


def _section(entry: PromptEntry, out: Path) -> tuple[str, bool]:
    folder = out / entry.folder
    sidecar = load_sidecar(folder)
    prompt = f"<blockquote>{html.escape(entry.prompt)}</blockquote>"
    if sidecar is None:
        return (f'<section class="missing">{prompt}<p class="note">line {entry.index}: not made yet '
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
    return f'<section>{prompt}<p class="note">{meta}</p><div class="images">{images}</div></section>', True


def write_gallery(entries: list[PromptEntry], out: Path, title: str) -> tuple[Path, int]:
    """Write `<out>/gallery.html`; returns it and how many prompts are done."""
    sections = [_section(entry, out) for entry in entries]
    done = sum(ok for _, ok in sections)
    page = render_template(GALLERY, title=html.escape(title),
                           summary=f"{done} of {len(entries)} prompts done",
                           sections="\n".join(text for text, _ in sections))
    path = out / GALLERY
    atomic_write_text(path, page)
    return path, done
