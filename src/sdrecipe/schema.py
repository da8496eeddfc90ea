"""Located YAML: values that remember their file and line, for errors a user can find.

PyYAML's `safe_load` forgets where a value came from. We compose the node tree
once, record the line of every mapping key and sequence item, and construct the
values from that same tree. `Node` then hands out typed children and raises
`RecipeError(file, line, field, message)` when the data is wrong. Every recipe
section (and env profile) is validated through this one API.

The loader is strict, because bundles carry `recipe/` to machines that restore
them: anchors and aliases are refused (a few hundred bytes of nested aliases
expand to gigabytes, and no sdrecipe file needs them), a key given twice is an
error naming both lines (YAML would keep the last one silently), and a file that
is not UTF-8 is refused naming the byte offset.
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


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without anchors or aliases, and without duplicate keys."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name) are not allowed in sdrecipe "
                "files; write the value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)):
                    continue  # an unhashable key: SafeLoader reports it
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} at lines {seen[key]} and {line}; "
                        "keep one", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep)


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(path, line, "", f"not UTF-8 text: byte offset {exc.start} "
                          f"(0x{data[exc.start]:02x}); save the file as UTF-8") from None


def load_yaml(path: Path) -> "Node":
    """Parse a YAML file into a located root `Node`; syntax errors name the line."""
    path = Path(path)
    try:
        text = _decode(path, path.read_bytes())
    except OSError as exc:
        raise RecipeError(path, None, "", f"cannot read: {exc.strerror}") from exc
    loader = _StrictLoader(text)
    try:
        tree = loader.get_single_node()
        value = loader.construct_document(tree) if tree is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(path, line, "", f"invalid YAML: {problem}") from exc
    except RecursionError:
        raise RecipeError(path, None, "", "invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()
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
