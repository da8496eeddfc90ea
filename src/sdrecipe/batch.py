"""Prompt batches: read a prompt file, name each prompt's folder, know which are done.

A prompt's folder is `<slug>-<hash>` where the hash covers the prompt text and the
sampling settings: editing or reordering the prompt file keeps finished prompts
finished, and changing the settings (steps, size, seed...) makes new folders
instead of passing old images off as new ones. The in-job runner
(`payload/txt2img_batch.py`) owns what "done" means; this side only plans.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SdrecipeError
from .payload import txt2img_batch as runner

SAMPLERS = ("plms", "ddim", "dpm")
# Upstream txt2img.py's defaults, except one pass per prompt (n_iter) instead of two.
# `smoke`: the tiny generated models instead of the real weights.
DEFAULT_SETTINGS = {"sampler": "plms", "steps": 50, "n_samples": 3, "n_iter": 1,
                    "H": 512, "W": 512, "scale": 7.5, "seed": 42, "precision": "autocast",
                    "smoke": False}


@dataclass(frozen=True)
class PromptEntry:
    index: int  # 1-based line number in the prompt file
    prompt: str
    folder: str


def read_prompts(path: Path) -> list[tuple[int, str]]:
    """(line number, prompt) for every non-blank line that is not a `#` comment."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SdrecipeError(f"{path}: cannot read the prompt file ({exc}); expected UTF-8 text, "
                            "one prompt per line") from exc
    prompts = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise SdrecipeError(f"{path}: no prompts (one per line; blank lines and # comments "
                            "are skipped)")
    return prompts


def folder_name(prompt: str, settings: dict) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-") or "prompt"
    digest = hashlib.sha256(json.dumps([prompt, settings], sort_keys=True).encode()).hexdigest()
    return f"{slug}-{digest[:10]}"


def plan(prompts_file: Path, settings: dict) -> list[PromptEntry]:
    """One entry per distinct prompt, in file order."""
    entries, seen = [], set()
    for number, prompt in read_prompts(prompts_file):
        folder = folder_name(prompt, settings)
        if folder not in seen:
            seen.add(folder)
            entries.append(PromptEntry(number, prompt, folder))
    return entries


def pending(entries: list[PromptEntry], out: Path) -> list[PromptEntry]:
    return [e for e in entries if not runner.is_done(str(out / e.folder))]


def manifest_text(entries: list[PromptEntry], settings: dict, out: Path, source: Path,
                  models, pinned=()) -> str:
    """What the in-job runner reads: prompts, settings, where to write, which upstream and
    model files (`models.Models`), and the pinned files it proves before loading any
    (`artifacts.Proven`, with their stat at submission)."""
    from .placement import stat_fields  # filelock: not at `--help` time (cli imports batch)
    return json.dumps({"out": str(out), "source": str(source), "settings": settings,
                       "models": {"config": str(models.config), "ckpt": str(models.ckpt)},
                       "pinned": [{"path": str(p.target), "sha256": p.sha256,
                                   "stat": stat_fields(p.target)} for p in pinned],
                       "prompts": [{"index": e.index, "prompt": e.prompt, "folder": e.folder}
                                   for e in entries]}, indent=2, ensure_ascii=False)


def load_sidecar(folder: Path) -> dict | None:
    if not runner.is_done(str(folder)):
        return None
    return json.loads((folder / runner.SIDECAR).read_text(encoding="utf-8"))
