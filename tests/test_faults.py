"""Issue 10's fault campaign, findings 1-6, each reproduced against the real parts:
crafted bundles and recipes, bytes changed in place, read-only folders, a full
filesystem (a small tmpfs where one can be mounted), concurrent runs, and the cache's
garbage collection. Against main each of these failed; here each must hold.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sdrecipe.cli import main
from sdrecipe.errors import RecipeError
from sdrecipe.schema import load_yaml
from test_recipe import GOOD


# --- finding 5: a recipe loader that cannot be blown up -------------------------------------

def alias_bomb(levels: int = 6) -> str:
    """Each level a list of nine aliases of the one before: 9**levels strings once expanded."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for n in range(1, levels + 1):
        refs = ", ".join([f"*a{n - 1}"] * 9)
        lines.append(f"a{n}: &a{n} [{refs}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_naming_its_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    with pytest.raises(RecipeError, match=r"bomb.yaml:1: .*anchors and aliases"):
        load_yaml(path)


def test_a_recipe_with_aliases_is_one_line_error_from_the_cli(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(GOOD + alias_bomb())
    assert main(["--recipe", str(recipe), "lint"]) == 2
    err = capsys.readouterr().err
    assert "anchors and aliases" in err and str(recipe) in err and "Traceback" not in err


def test_a_duplicate_key_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: one\nschema: 1\nname: two\n")
    with pytest.raises(RecipeError, match=r"dup.yaml:3: .*duplicate key 'name' at lines 1 and 3"):
        load_yaml(path)


def test_a_non_utf8_recipe_names_the_file_and_byte_offset(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(GOOD.replace("name: tiny", "name: caf\xe9").encode("latin-1"))
    offset = GOOD.index("name: tiny") + len("name: caf")
    assert main(["--recipe", str(recipe), "lint"]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}:" in err and f"byte offset {offset} (0xe9)" in err
    assert "Traceback" not in err


def test_nesting_too_deep_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RecipeError, match="nested too deeply"):
        load_yaml(path)
