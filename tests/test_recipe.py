"""Recipe validation: broken YAML gets an error naming file, line and field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from patch_fixtures import PROFILES_YAML
from sdrecipe.errors import RecipeError, SdrecipeError
from sdrecipe.project import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SHA = "ab" * 32
GOOD = f"""\
schema: 1
name: tiny
upstream:
  url: https://example.org/tiny
  commit: 21f890f9da3cfbeaba8e2ac3c425ee9e998d5229
  mirrors: [https://mirror.example.org/tiny]
patches:
  dir: patches/tiny
  series:
    - file: 0001-a.patch
      sha256: {SHA}
      summary: first
    - file: 0002-b.patch
      sha256: {SHA}
      summary: cpu only
      when: [cpu]
{PROFILES_YAML}"""


def write(tmp_path, text) -> Path:
    path = tmp_path / "recipe" / "r.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def line_of(text, needle, occurrence=1) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    return lines[occurrence - 1]


def test_a_good_recipe_loads_and_filters_by_profile(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert recipe.upstream.urls == ("https://mirror.example.org/tiny", "https://example.org/tiny")
    assert [p.file for p in recipe.series("cuda")] == ["0001-a.patch"]
    assert [p.file for p in recipe.series("cpu")] == ["0001-a.patch", "0002-b.patch"]
    assert recipe.patch_dir == tmp_path / "patches" / "tiny"


def test_a_profile_may_have_any_plain_name(tmp_path):
    """Profiles are the recipe's to name (a new platform needs no code change); `when`,
    `--profile` and the other sections check against them."""
    text = GOOD.replace("  cpu:", "  rocm-5.4_cpu:").replace("when: [cpu]", "when: [rocm-5.4_cpu]")
    recipe = load_recipe(write(tmp_path, text))
    assert list(recipe.profiles) == ["dtk-22.10", "cuda", "rocm-5.4_cpu"]
    assert [p.file for p in recipe.series("rocm-5.4_cpu")] == ["0001-a.patch", "0002-b.patch"]
    with pytest.raises(SdrecipeError, match=r"unknown profile 'cpu' in .*known: dtk-22.10, cuda, "
                                            r"rocm-5.4_cpu\)$"):
        recipe.profile("cpu")


def test_the_shipped_recipe_loads():
    recipe = load_recipe(ROOT / "recipe" / "stable-diffusion.yaml")
    assert recipe.upstream.commit == "21f890f9da3cfbeaba8e2ac3c425ee9e998d5229"
    assert set(recipe.profiles) == {"dtk-22.10", "cuda", "cpu"}


@pytest.mark.parametrize("old, new, needle, field, message", [
    ("name: tiny", "name: tiny: two", "name: tiny: two", "",
     "invalid YAML: mapping values are not allowed here"),
    ("  commit: 21f890f9da3cfbeaba8e2ac3c425ee9e998d5229\n", "", "upstream:",
     "upstream", "missing required field 'commit'"),
    ("schema: 1", "schema: '1'", "schema:", "schema", "expected an integer"),
    ("summary: first", "summary: [first]", "summary: [first]", "patches.series[0].summary",
     "expected a string"),
    (f"sha256: {SHA}\n      summary: first", "sha256: abc123\n      summary: first", "abc123",
     "patches.series[0].sha256", "expected a 64-hex sha256"),
    ("commit: 21f890f9da3cfbeaba8e2ac3c425ee9e998d5229", "commit: main", "commit: main",
     "upstream.commit", "full 40-character commit sha"),
    ("  mirrors:", "  branch: main\n  mirrors:", "branch: main", "upstream.branch", "unknown field"),
    ("name: tiny", "name: tiny\nmodels: []", "models: []", "models", "unknown field (allowed: "
     "artifacts, name, patches, profiles, schema, slurm, upstream, verify)"),
    ("when: [cpu]", "when: [rocm]", "when: [rocm]", "patches.series[1].when[0]",
     "unknown value 'rocm' (known: dtk-22.10, cuda, cpu)"),
    ("file: 0002-b.patch", "file: ../0002-b.patch", "../0002", "patches.series[1].file",
     "plain file name"),
    ("file: 0002-b.patch", "file: 0001-a.patch", "file: 0001-a.patch", "patches.series[1].file",
     "listed twice"),
    ("schema: 1", "schema: 2", "schema:", "schema", "unsupported schema version 2"),
    ("    accelerator: none", "    accelerator: tpu", "accelerator: tpu",
     "profiles.cpu.accelerator", "expected one of dcu, cuda, none"),
    ("  cpu:", "  CPU:", "  CPU:", "profiles.CPU", "profile name 'CPU' must be lowercase"),
    ("  cpu:", "  cpu/avx:", "  cpu/avx:", "profiles.cpu/avx", "starting with a letter or digit"),
    ("  cpu:", "  .cpu:", "  .cpu:", "profiles..cpu", "profile name '.cpu'"),
])
def test_broken_recipes_name_file_line_and_field(tmp_path, old, new, needle, field, message):
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as failure:
        load_recipe(path)
    error = failure.value
    occurrence = 2 if needle == "file: 0001-a.patch" else 1
    assert error.file == str(path)
    assert error.line == line_of(text, needle, occurrence), str(error)
    assert error.field == field
    assert str(error).startswith(f"{path}:{error.line}: ")
    assert re.search(re.escape(message), str(error)), str(error)
