"""The verify report: `report.json` (the contract in verify.py's docstring) and a
self-contained `report.html` a person can open anywhere, e.g. copied off the cluster:
thumbnails are inline base64 PNGs, the style is inline, nothing is fetched.

`deployed_inputs` (upstream commit, each patch with its sha256 and state, lock and
recipe hashes) is shared with `deploy.py`'s provenance.json, so both say the same;
its file hashes (`input_hashes`) are also what deploy's verify fingerprint is made of.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from importlib import resources
from pathlib import Path
from string import Template

from .errors import SdrecipeError
from .files import atomic_write_text, sha256_file

THUMBNAIL_PX = 256


def lock_hash(recipe, profile: str) -> str | None:
    """The content hash of the profile's environment lock, or None when there is no lock yet."""
    from .lock import load_lock
    try:
        return load_lock(recipe, profile).content_hash
    except SdrecipeError:
        return None


def input_hashes(recipe, profile: str) -> dict:
    """sha256 of the recipe file and of each patch of the profile's series (None: missing)."""
    def sha256_or_none(path: Path):
        return sha256_file(path) if path.is_file() else None
    return {"recipe_sha256": sha256_or_none(recipe.path),
            "patches": {e.file: sha256_or_none(recipe.patch_dir / e.file)
                        for e in recipe.series(profile)}}


def deployed_inputs(recipe, deployment, profile: str, tree=None, lock=None, hashes=None) -> dict:
    """What the deployment was made from: recipe, upstream commit, patches, lock.

    `tree` (a patches.TreeState), `lock` (the lock's content hash) and `hashes`
    (`input_hashes`) may be passed by a caller that has them already."""
    import git
    from .patches import tree_state
    try:
        head = git.Repo(deployment.source).head.commit.hexsha
    except (git.GitError, ValueError, OSError):
        head = None
    states = {}
    if head == recipe.upstream.commit:
        tree = tree or tree_state(deployment.source, recipe, profile)
        states = {p.entry.file: p.state for p in tree.patches}
    hashes = hashes or input_hashes(recipe, profile)
    patches = [{"file": file, "sha256": sha256, "state": states.get(file, "unknown")}
               for file, sha256 in hashes["patches"].items()]
    return {"recipe_sha256": hashes["recipe_sha256"], "upstream_pinned": recipe.upstream.commit,
            "upstream_commit": head, "patches": patches,
            "lock_hash": lock if lock is not None else lock_hash(recipe, profile)}


def provenance(recipe, deployment, profile: str, runtime: dict, models: str) -> dict:
    return {**deployed_inputs(recipe, deployment, profile), "runtime": runtime, "models": models}


# --- writing ---------------------------------------------------------------------------

def _thumbnail(path: Path, size: int, image_format: str) -> bytes:
    """`path` scaled to fit `size` pixels square, encoded as `image_format`."""
    from PIL import Image
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format=image_format, optimize=True,
                   **({"quality": 80} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def thumbnail_data_uri(path: Path) -> str:
    """A PNG thumbnail (at most THUMBNAIL_PX square) as a data URI: pages stay
    self-contained without embedding full-size images (3 x 512² per prompt adds up)."""
    data = _thumbnail(path, THUMBNAIL_PX, "PNG")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def write_thumbnail(path: Path, dest: Path, size: int) -> None:
    """A JPEG thumbnail of `path` at `dest`, written beside it and renamed into place (a
    page never links a half-written file); kept when already there (images never change
    once made)."""
    if dest.is_file():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    temporary = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    temporary.write_bytes(_thumbnail(path, size, "JPEG"))
    os.replace(temporary, dest)


def _rows(pairs) -> str:
    return "\n".join(f"<tr><th>{html.escape(str(k))}</th><td class=\"mono\">{html.escape(str(v))}</td></tr>"
                     for k, v in pairs)


def _seconds(value) -> str:
    return "not measured" if value is None else f"{value:.2f} s"


def render_template(name: str, **fields: str) -> str:
    """Fill `templates/<name>` (string.Template `$field`s; values are already HTML)."""
    return Template(resources.files("sdrecipe").joinpath(f"templates/{name}")
                    .read_text(encoding="utf-8")).substitute(**fields)


def render_html(out: Path, data: dict) -> str:
    figures = []
    for relative in data["images"]:
        src = thumbnail_data_uri(out / relative)
        figures.append(f'<figure><img src="{src}" alt="{html.escape(relative)}">'
                       f"<figcaption>{html.escape(relative)}</figcaption></figure>")
    checks = "\n".join(
        f'<tr><td class="{"ok" if c["ok"] else "bad"}">{"ok" if c["ok"] else "FAIL"}</td>'
        f"<th>{html.escape(c['name'])}</th><td>{html.escape(c['message'])}</td></tr>"
        for c in data["checks"])
    prov = data["provenance"]
    runtime = prov.get("runtime") or {}
    pairs = [("upstream commit", prov.get("upstream_commit") or "not a checkout"),
             ("pinned commit", prov.get("upstream_pinned"))]
    pairs += [(f"patch {p['file']}", f"{p['sha256']} ({p['state']})") for p in prov.get("patches", [])]
    pairs += [("environment lock hash", prov.get("lock_hash") or "no lock"),
              ("recipe sha256", prov.get("recipe_sha256")), ("models", prov.get("models"))]
    pairs += [(name, runtime.get(name, "not reported"))
              for name in ("device", "backend", "python", "torch", "transformers", "diffusers")]
    return render_template(
        "report.html",
        title=html.escape(f"sdrecipe verify: {data['profile']}"
                          + (" (smoke)" if data.get("smoke") else "")),
        verdict="PASSED" if data["ok"] else "FAILED",
        verdict_class="pass" if data["ok"] else "fail",
        created=html.escape(data.get("created", "")), profile=html.escape(data["profile"]),
        smoke_note=(" &middot; smoke run on tiny random models: the image is noise by design"
                    if data.get("smoke") else ""),
        prompt=html.escape(data["prompt"]),
        images="\n".join(figures) or '<p class="note">no image was written</p>',
        checks=checks,
        settings=_rows(sorted(data["settings"].items())),
        timings=_rows((k.removesuffix("_s").replace("_", " "), _seconds(v))
                      for k, v in data["timings"].items()),
        provenance=_rows(pairs))


def write(out: Path, data: dict) -> None:
    """Write report.json and report.html into `out` (each atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(data, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / "report.html", render_html(out, data))


def read(out: Path) -> dict | None:
    try:
        return json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
