"""Located YAML: values that remember their file and line, for errors a user can find.

PyYAML's `safe_load` forgets where a value came from. We load the values with it
and, in the same pass over the text, compose the node tree to record the line of
every mapping key and sequence item. `Node` then hands out typed children and
raises `RecipeError(file, line, field, message)` when the data is wrong.
Every recipe section (and env profile) is validated through this one API.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import yaml

from .errors import RecipeError

SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
               dict: "a mapping", float: "a number"}


def _record_lines(node, path, lines):
    """Map each path (tuple of keys and indices) to its 1-based line."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = path + (key_node.value,)
            _record_lines(value_node, child, lines)
            lines[child] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, path + (index,), lines)


def load_yaml(path: Path) -> "Node":
    """Parse a YAML file into a located root `Node`; syntax errors name the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(path, None, "", f"cannot read: {exc.strerror}") from exc
    try:
        value = yaml.safe_load(text)
        tree = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(path, line, "", f"invalid YAML: {problem}") from exc
    lines: dict = {}
    if tree is not None:
        _record_lines(tree, (), lines)
    return Node(value if value is not None else {}, (), path, lines)


class Node:
    """A YAML value plus where it came from."""

    def __init__(self, value: Any, path: tuple, file: Path, lines: dict):
        self.value, self.path, self.file, self._lines = value, path, Path(file), lines

    @property
    def line(self) -> int | None:
        path = self.path
        while path not in self._lines and path:
            path = path[:-1]
        return self._lines.get(path)

    @property
    def field(self) -> str:
        out = ""
        for part in self.path:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
        return out

    def error(self, message: str) -> RecipeError:
        return RecipeError(self.file, self.line, self.field, message)

    def _child(self, key) -> "Node":
        return Node(self.value[key], self.path + (key,), self.file, self._lines)

    def expect(self, kind: type) -> "Node":
        ok = isinstance(self.value, kind) and not (kind is int and isinstance(self.value, bool))
        if not ok:
            raise self.error(f"expected {_TYPE_NAMES.get(kind, kind.__name__)}, "
                             f"got {type(self.value).__name__} {self.value!r}")
        return self

    def keys(self, required=(), optional=()) -> "Node":
        """Check this mapping has every required key and nothing unknown."""
        self.expect(dict)
        for key in required:
            if key not in self.value:
                raise self.error(f"missing required field '{key}'")
        allowed = set(required) | set(optional)
        for key in self.value:
            if key not in allowed:
                raise self._child(key).error(
                    f"unknown field (allowed: {', '.join(sorted(allowed))})")
        return self

    def has(self, key) -> bool:
        return isinstance(self.value, dict) and key in self.value

    def get(self, key, kind: type | None = None) -> "Node":
        """A required child, optionally type-checked."""
        self.expect(dict)
        if key not in self.value:
            raise self.error(f"missing required field '{key}'")
        child = self._child(key)
        return child.expect(kind) if kind else child

    def opt(self, key, kind: type | None = None, default=None):
        """An optional child's plain value, type-checked; `default` when absent or null."""
        if not self.has(key) or self.value[key] is None:
            return default
        return self.get(key, kind).value

    def items(self) -> Iterator["Node"]:
        self.expect(list)
        return (self._child(i) for i in range(len(self.value)))

    def entries(self) -> Iterator[tuple[str, "Node"]]:
        self.expect(dict)
        return ((k, self._child(k)) for k in self.value)

    def text(self, key, pattern: re.Pattern | None = None, what: str = "") -> str:
        """A required non-empty string field, optionally matching `pattern`."""
        child = self.get(key, str)
        if not child.value.strip():
            raise child.error("must not be empty")
        if pattern is not None and not pattern.match(child.value):
            raise child.error(f"expected {what or pattern.pattern}, got {child.value!r}")
        return child.value

    def string_list(self, key, allowed=None) -> tuple | None:
        """An optional list of strings, each one of `allowed` when given."""
        if not self.has(key) or self.value[key] is None:
            return None
        out = []
        for item in self.get(key, list).items():
            item.expect(str)
            if allowed is not None and item.value not in allowed:
                raise item.error(f"unknown value {item.value!r} (known: {', '.join(allowed)})")
            out.append(item.value)
        return tuple(out)
