"""Reading a patch file: its DEP-3 header, its file diffs and hunks, each with its line.

Both `patches` (to name the patch line behind a `git apply` failure) and
`patch_lint` (every check) read patches; this module sits below both, so
neither has to import the other.
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from unidiff import PatchSet
from unidiff.errors import UnidiffParseError

_FIELD_RE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):(?:\s+(.*))?$")
_INDEX_RE = re.compile(r"^index ([0-9a-f]+)\.\.([0-9a-f]+)(?: \d{6})?$")
_GIT_FAIL_RE = re.compile(r"patch failed: (.+):(\d+)")
_GIT_PATH_RE = re.compile(r"(?:^|; )(\S+): (?:No such file|does not exist|already exists|"
                          r"patch does not apply|does not match index)")


@dataclass
class Hunk:
    line: int  # the `@@` line
    old_start: int
    new_start: int


@dataclass
class Section:
    """One file of a patch: where its headers are and what they say."""
    line: int  # `diff --git` (or `---`) line
    old: str | None = None  # `---` path as written ("a/x" or "/dev/null")
    new: str | None = None
    old_line: int | None = None
    index_line: int | None = None
    pre: str | None = None
    post: str | None = None
    hunks: list = field(default_factory=list)
    added: list = field(default_factory=list)  # (line, text) of `+` lines

    @staticmethod
    def _strip(raw, prefix):
        if raw is None or raw == "/dev/null":
            return None
        return raw[len(prefix):] if raw.startswith(prefix) else raw

    @property
    def old_path(self):
        return self._strip(self.old, "a/")

    @property
    def new_path(self):
        return self._strip(self.new, "b/")

    @property
    def path(self):
        return self.new_path or self.old_path


@dataclass
class ParsedPatch:
    path: Path
    data: bytes
    lines: list  # decoded lines, no line ends
    header: list  # (line, name, value) DEP-3 fields
    header_problems: list  # (line, message)
    sections: list
    problems: list  # (line, message) structural problems of the diff


def _parse_header(lines):
    """DEP-3 fields up to the first blank line, `---` or diff line."""
    fields, problems = [], []
    for number, line in enumerate(lines, 1):
        if (not line.strip() or line == "---" or line.startswith(("diff --git ", "--- ", "Index: "))):
            break
        if line[0] in " \t" and fields:
            lineno, name, value = fields[-1]
            fields[-1] = (lineno, name, (value + "\n" + line.strip()).strip())
            continue
        match = _FIELD_RE.match(line)
        if not match:
            problems.append((number, f"not a DEP-3 `Field: value` line: {line[:60]!r}"))
            continue
        fields.append((number, match.group(1), (match.group(2) or "").strip()))
    return fields, problems


class _Partial(PatchSet):
    """unidiff's parse, keeping the files read before an error, and where it stopped."""

    def __init__(self, text: str):
        self.number = 0  # the last line unidiff read
        self.hunk_line = None  # the last `@@` line it read
        self.error = None
        try:
            super().__init__(self._numbered(text))
        except UnidiffParseError as exc:
            self.error = exc

    def _numbered(self, text):
        for self.number, line in enumerate(io.StringIO(text), 1):
            if line.startswith("@@"):
                self.hunk_line = self.number
            yield line


_LONGER = "hunk is longer than its `@@` header says (lines were added by hand?)"
_SHORTER = "hunk is shorter than its `@@` header says (lines were added or removed by hand?)"


def _git_header(patched, lines, section: Section, problems):
    """The `index` line of a git diff and the line of its `---`. unidiff keeps neither
    line number, and takes the paths from `diff --git`; the a/ b/ check needs `---`/`+++`
    as written. Its header lines are the patch's lines in order, minus `---`/`+++`."""
    at, numbers = section.line, []
    for text in patched.patch_info:
        while lines[at - 1] != text.rstrip("\n"):
            at += 1
        numbers.append(at)
        at += 1
    index = [n for n in numbers if lines[n - 1].startswith("index ")]
    if index:
        section.index_line = index[-1]
        match = _INDEX_RE.match(lines[index[-1] - 1])
        if match:
            section.pre, section.post = match.groups()
        else:
            problems.append((index[-1], f"malformed index line {lines[index[-1] - 1]!r}"))
    end = next((n for n in range(section.line + 1, len(lines))
                if lines[n - 1].startswith("diff --git ")), len(lines))
    return next((n for n in range(section.line + 1, end) if n not in numbers and
                 lines[n - 1].startswith("--- ") and lines[n].startswith("+++ ")), None)


def _section(patched, lines, problems) -> Section:
    """One file of unidiff's parse, with line numbers for every header a check names."""
    if lines[patched.diff_line_no - 1].startswith("diff --git "):
        section = Section(patched.diff_line_no)
        old_line = _git_header(patched, lines, section, problems)
    else:  # a plain unified diff: unidiff's line is its `+++` line
        old_line = patched.diff_line_no - 1
        section = Section(old_line)
    if old_line is not None:
        section.old_line = old_line
        section.old, section.new = (lines[n][4:].split("\t")[0] for n in (old_line - 1, old_line))
    for hunk in patched:
        numbers = [line.diff_line_no for line in hunk if line.diff_line_no is not None]
        at = numbers[0] - 1  # the `@@` line
        if section.old is None or at < old_line:
            problems.append((at, "hunk header outside a file or malformed"))
            continue
        section.hunks.append(Hunk(at, hunk.source_start, hunk.target_start))
        section.added += [(line.diff_line_no, line.value.rstrip("\n"))
                          for line in hunk if line.is_added]
        after = lines[numbers[-1]] if numbers[-1] < len(lines) else ""
        if after[:1] in ("+", "-", " ") and after != "-- " and not after.startswith(("--- ", "+++ ")):
            problems.append((at, _LONGER))  # unidiff ends the hunk there and reads on
    return section


def _parse_error(parsed: _Partial):
    """unidiff's error, at the line it read last (a hunk's error at its `@@` line)."""
    message = str(parsed.error).strip()
    if message.startswith("Hunk is longer"):
        return parsed.hunk_line, _LONGER
    if message.startswith(("Hunk is shorter", "Hunk diff line expected")):
        return parsed.hunk_line, _SHORTER
    return parsed.number, f"unidiff cannot parse it: {message}"


@functools.lru_cache(maxsize=256)
def _parse_cached(path: str, data: bytes) -> ParsedPatch:
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    lines = text.split("\n")
    header, header_problems = _parse_header(lines)
    parsed, problems = _Partial(text), []
    sections = [_section(patched, lines, problems) for patched in parsed]
    hunk_lines = {hunk[0].diff_line_no - 1 for patched in parsed for hunk in patched}
    read = parsed.number if parsed.error else len(lines)
    # unidiff takes a malformed `@@` line (or one outside a file) for header text: say so
    problems += [(number, "hunk header outside a file or malformed")
                 for number, line in enumerate(lines[:read], 1)
                 if line.startswith("@@") and number not in hunk_lines
                 and not (parsed.error and number == parsed.hunk_line)]
    if parsed.error:
        problems.append(_parse_error(parsed))
    if not sections:
        problems.append((None, "no file diffs found"))
    return ParsedPatch(Path(path), data, lines, header, header_problems, sections, problems)


def parse_patch(path: Path) -> ParsedPatch:
    """Parse once per content: every check and every profile reads the same patches."""
    return _parse_cached(str(path), Path(path).read_bytes())


def locate_apply_error(path: Path, message: str | None) -> int | None:
    """The patch line behind `git apply`'s message: the failing hunk, else the file header."""
    if not message or not Path(path).is_file():
        return None
    sections = parse_patch(path).sections
    failed = _GIT_FAIL_RE.search(message)
    if failed:
        name, start = failed.group(1), int(failed.group(2))
        for section in sections:
            if section.path == name:
                # a forward apply names the hunk's old start, a reverse apply its new start
                hunk = next((h for h in section.hunks if h.old_start == start), None) or \
                    next((h for h in section.hunks if h.new_start == start), None)
                return hunk.line if hunk else section.line
    named = _GIT_PATH_RE.search(message)
    if named:
        return next((s.line for s in sections if named.group(1) in (s.old_path, s.new_path)), None)
    return None
