"""`gallery.html`: the images of a prompt batch next to their prompts, quick to open at any size.

After a batch, a person wants to see the images next to their prompts, not walk
through folders. A batch of 1,000 prompts makes 3,000 images: inlining them (even
as thumbnails) would make a page of hundreds of megabytes. So each image gets a
small JPEG thumbnail file under `thumbnails/` (made once, when its prompt is done),
the prompts are split into pages of PAGE_PROMPTS (`gallery.html` is the first,
`gallery-2.html`... the next, each linking every other), and the thumbnails load
lazily (`loading="lazy"`, with their size given, so the page lays out at once).
Each thumbnail links to its full-size PNG in the prompt's folder beside the page;
prompts not done yet are listed, so a partial batch says what a resubmission would
still make. `submit generate` rewrites the pages as the array's tasks finish. Pages
are rendered from `templates/gallery.html` by the verify report's renderer.
"""

from __future__ import annotations

import html
from pathlib import Path

from .batch import PromptEntry, load_sidecar
from .files import atomic_write_text
from .report import render_template, write_thumbnail

GALLERY = "gallery.html"
THUMBNAILS = "thumbnails"
PAGE_PROMPTS = 100
THUMBNAIL_PX = 160


def page_name(number: int) -> str:
    return GALLERY if number == 1 else f"gallery-{number}.html"


def _figure(out: Path, folder: Path, name: str, size: tuple[int, int]) -> str:
    thumbnail = f"{THUMBNAILS}/{folder.name}/{Path(name).stem}.jpg"
    write_thumbnail(folder / name, out / thumbnail, THUMBNAIL_PX)
    width, height = size
    return (f'<a href="{html.escape(folder.name)}/{html.escape(name)}">'
            f'<img alt="{html.escape(name)}" src="{html.escape(thumbnail)}" loading="lazy" '
            f'width="{width}" height="{height}"></a>')


def _thumbnail_size(settings: dict) -> tuple[int, int]:
    """The thumbnail's size from the sampling settings, so no image need be opened to lay
    out the page (PIL's thumbnail keeps the aspect ratio, rounding)."""
    width, height = settings.get("W") or 512, settings.get("H") or 512
    scale = min(1.0, THUMBNAIL_PX / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


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
    size = _thumbnail_size(settings)
    images = "".join(_figure(out, folder, name, size) for name in sidecar["images"])
    return f'<section>{prompt}<p class="note">{meta}</p><div class="images">{images}</div></section>', True


def _page_links(current: int, pages: int, entries_count: int) -> str:
    if pages == 1:
        return ""
    links = []
    for number in range(1, pages + 1):
        first = (number - 1) * PAGE_PROMPTS + 1
        last = min(number * PAGE_PROMPTS, entries_count)
        label = f"{first}–{last}"
        links.append(f'<b>{label}</b>' if number == current else
                     f'<a href="{page_name(number)}">{label}</a>')
    return f'<nav>prompts: {" · ".join(links)}</nav>'


def write_gallery(entries: list[PromptEntry], out: Path, title: str) -> tuple[Path, int]:
    """Write `<out>/gallery.html` and its further pages; returns the first page and how
    many prompts are done."""
    sections = [_section(entry, out) for entry in entries]
    done = sum(ok for _, ok in sections)
    pages = max(1, -(-len(sections) // PAGE_PROMPTS))
    for number in range(1, pages + 1):
        chunk = sections[(number - 1) * PAGE_PROMPTS:number * PAGE_PROMPTS]
        nav = _page_links(number, pages, len(sections))
        page = render_template(GALLERY, title=html.escape(title), pages=nav,
                               summary=f"{done} of {len(entries)} prompts done",
                               sections="\n".join(text for text, _ in chunk))
        atomic_write_text(out / page_name(number), page)
    return out / GALLERY, done
