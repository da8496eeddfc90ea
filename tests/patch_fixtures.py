"""A tiny upstream, a tiny DEP-3 series against it and a tiny recipe, built with real git.

`build_template(dir)` makes, once per test session:
  author/   a git repo: the upstream's pinned commit, then one commit per patch
            (the patches are `git diff --full-index` between those commits)
  upstream/ a clone made before the patch commits existed: the pristine upstream
  project/  recipe/test.yaml, patches/tiny/*.patch, lock/upstream.lock
Tests copy the project and clone the upstream into their own tmp dirs: the fixtures
`template` (module scope) and `tiny` (per test: `instance(template, tmp_path)`), registered
in conftest.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}

BASE = {
    "app/main.py": "import os\nimport sys\n\n\ndef main():\n    device = 'cuda'\n"
                   "    print('hello', device)\n\n\nif __name__ == '__main__':\n    main()\n",
    "app/util.py": "def helper():\n    return 1\n\n\ndef other():\n    return 2\n",
    "lib/core.py": "class Model:\n    def to_device(self):\n        return self.cuda()\n",
    "README.md": "tiny upstream\n",
}

MAIN_SYSPATH = BASE["app/main.py"].replace(
    "import sys\n", "import sys\n\nsys.path.insert(0, os.path.dirname(os.path.dirname("
                    "os.path.abspath(__file__))))\n")

# (file name, when, DEP-3 description, {path: new content}); 0003 edits main.py after 0001 did.
SERIES = [
    ("0001-main-syspath.patch", None, "Put the repository root on sys.path",
     {"app/main.py": MAIN_SYSPATH}),
    ("0002-util-helper.patch", None, "Add a helper module and use it",
     {"app/util.py": BASE["app/util.py"].replace("return 1", "return 10"),
      "extra/helpers/local.py": "LOCAL = True\n"}),
    ("0003-cpu-device.patch", ["cpu"], "Follow the available device",
     {"lib/core.py": BASE["lib/core.py"].replace("self.cuda()", "self.to('cpu')"),
      "app/main.py": MAIN_SYSPATH.replace("device = 'cuda'", "device = 'cpu'")}),
]


def git(cwd, *args, check=True) -> str:
    env = dict(os.environ, **GIT_ENV)
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=check, text=True,
                          capture_output=True).stdout


def dep3(description, bug=True) -> str:
    lines = [f"Description: {description}",
             " A longer explanation of why the change is needed.",
             "Author: Tiny Tester <tiny@example.org>",
             "Origin: vendor, https://example.org/sdrecipe",
             ]
    if bug:
        lines.append("Bug: https://example.org/upstream/issues/1")
    lines += ["Forwarded: not-needed", "Last-Update: 2024-05-01", "", ""]
    return "\n".join(lines)


def _write(root: Path, files: dict):
    """Write each file of `files` (path -> text) under `root`."""
    for path, text in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


PROFILES_YAML = """\
profiles:
  dtk-22.10:
    description: DCU
    accelerator: dcu
  cuda:
    description: CUDA
    accelerator: cuda
  cpu:
    description: CPU
    accelerator: none
"""


def recipe_text(commit: str, series) -> str:
    entries = []
    for name, sha, when in series:
        entries.append(f"    - file: {name}\n      sha256: {sha}\n      summary: {name[5:-6]}\n"
                       + (f"      when: [{', '.join(when)}]\n" if when else ""))
    return f"""schema: 1
name: tiny
upstream:
  url: https://example.org/tiny
  commit: {commit}
  mirrors: []
patches:
  dir: patches/tiny
  series:
{''.join(entries)}{PROFILES_YAML}"""


def build_template(root: Path) -> dict:
    author, upstream, project = root / "author", root / "upstream", root / "project"
    author.mkdir(parents=True)
    git(author, "init", "-q")
    _write(author, BASE)
    git(author, "add", "-A")
    git(author, "commit", "-qm", "pinned upstream")
    commit = git(author, "rev-parse", "HEAD").strip()
    git(root, "clone", "-q", str(author), str(upstream))
    patch_dir = project / "patches" / "tiny"
    patch_dir.mkdir(parents=True)
    series = []
    for name, when, description, files in SERIES:
        before = git(author, "rev-parse", "HEAD").strip()
        _write(author, files)
        git(author, "add", "-A")
        git(author, "commit", "-qm", name)
        diff = git(author, "diff", "--full-index", before, "HEAD")
        data = (dep3(description) + diff).encode()
        (patch_dir / name).write_bytes(data)
        series.append((name, hashlib.sha256(data).hexdigest(), when))
    (project / "recipe").mkdir()
    (project / "recipe" / "test.yaml").write_text(recipe_text(commit, series))
    from sdrecipe.project import load_recipe
    from sdrecipe.upstream_lock import write_upstream_lock
    write_upstream_lock(upstream, load_recipe(project / "recipe" / "test.yaml"))
    return {"commit": commit, "upstream": upstream, "project": project, "author": author}


def instance(template: dict, dest: Path) -> dict:
    """A private copy of the project and a fresh clone of the upstream."""
    from sdrecipe.project import load_recipe
    project = dest / "project"
    shutil.copytree(template["project"], project)
    source = dest / "source"
    git(dest, "clone", "-q", str(template["upstream"]), str(source))
    recipe_path = project / "recipe" / "test.yaml"
    return {"commit": template["commit"], "project": project, "source": source,
            "recipe_path": recipe_path, "recipe": load_recipe(recipe_path),
            "dir": project / "patches" / "tiny"}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return build_template(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny(template, tmp_path):
    return instance(template, tmp_path)
