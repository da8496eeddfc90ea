"""The engine's import graph, read from the source: no cycles, no package module loaded by name.

Modules in a cycle can only be read, tested and moved together; a module loaded
by a string is an edge no reader and no tool sees. Every file under src/sdrecipe/
is parsed with `ast`, never imported (payload/ runs in another interpreter), and
an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "sdrecipe"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE



def parse_package(root: Path, package: str) -> dict:
    """Dotted module name -> (file as `package/...py`, syntax tree) for every .py under `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        shown = Path(package, path.relative_to(root))
        modules[".".join((package, *parts))] = (shown, ast.parse(path.read_text(), str(shown)))
    return modules


def imports_of(name: str, path: Path, tree: ast.AST, modules, package: str) -> dict:
    """Imported package module -> line of its first import, from anywhere in `tree`.

    `from X import n` imports module X.n when n is a submodule, else X itself."""
    own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:
                parts = own_package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target == package or target.startswith(package + "."):
                found.setdefault(target, node.lineno)
    return found


def import_graph(root: Path = SRC, package: str = PACKAGE):
    """module -> {imported module: line}, and the modules parsed."""
    modules = parse_package(root, package)
    graph = {name: imports_of(name, path, tree, modules, package)
             for name, (path, tree) in modules.items()}
    return graph, modules


def _reachable(graph, start) -> set:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def cycle_groups(graph) -> set:
    """Each group of modules that import one another, directly or through each other."""
    reach = {name: _reachable(graph, name) for name in graph}
    return {frozenset(other for other in reach[name] if name in reach.get(other, ()))
            for name in graph if name in reach[name]}


def describe(graph, modules, group) -> str:
    """The shortest chain from the group's first module back to it, and where each import is."""
    start = min(group)
    paths = {start: [start]}
    queue = [start]
    for current in queue:
        for target in sorted(graph[current]):
            if target == start:
                chain = paths[current] + [start]
                where = ", ".join(f"{modules[importer][0]}:{graph[importer][imported]}"
                                  for importer, imported in zip(chain, chain[1:]))
                rest = sorted(group - set(chain))
                also = f"; the group also holds {', '.join(rest)}" if rest else ""
                return f"{' -> '.join(chain)}  ({where}){also}"
            if target in group and target not in paths:
                paths[target] = paths[current] + [target]
                queue.append(target)
    raise AssertionError(f"no cycle through {start}")


def loads_by_name(tree: ast.AST, package: str) -> list:
    """(line, call) of each `import_module` call that may load a package module: its name
    is not a literal, or is a literal inside the package (or relative to it)."""
    aliases = {alias.asname or alias.name for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.module == "importlib"
               for alias in node.names if alias.name == "import_module"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if not ((isinstance(func, ast.Attribute) and func.attr == "import_module")
                or (isinstance(func, ast.Name) and func.id in aliases)):
            continue
        name = node.args[0] if node.args else None
        literal = isinstance(name, ast.Constant) and isinstance(name.value, str)
        if not literal or name.value == package or name.value.startswith((".", package + ".")):
            found.append((node.lineno, ast.unparse(node)))
    return found


def cycle_report(graph, modules, known=frozenset()) -> list:
    return sorted(describe(graph, modules, group) for group in cycle_groups(graph)
                  if group not in known)


def test_no_import_cycles():
    graph, modules = import_graph()
    cycles = cycle_report(graph, modules)
    assert not cycles, "import cycles (move what both sides need down into a module of " \
                       "its own):\n  " + "\n  ".join(cycles)


def test_no_package_module_is_loaded_by_name():
    _, modules = import_graph()
    found = {name: loads_by_name(tree, PACKAGE) for name, (_, tree) in modules.items()}
    offenders = [f"{modules[name][0]}:{line}: {call}"
                 for name, calls in sorted(found.items()) for line, call in calls]
    assert not offenders, "package modules loaded by name (import them instead, from a " \
                          "module above both):\n  " + "\n  ".join(offenders)


def test_every_package_import_names_a_module_of_the_package():
    graph, modules = import_graph()
    unknown = [f"{name} imports {target}" for name, targets in sorted(graph.items())
               for target in targets if target not in modules]
    assert not unknown, "\n".join(unknown)


def test_the_checks_see_relative_submodule_and_function_level_imports(tmp_path):
    files = {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "def later():\n    from .sub.c import helper\n",
        "sub/__init__.py": "",
        "sub/c.py": ("import importlib\nfrom ..a import thing\n\n"
                     "def load(name):\n    return importlib.import_module(f'pkg.{name}')\n"),
    }
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    graph, modules = import_graph(tmp_path, "pkg")
    chains = [line.split("  (")[0] for line in cycle_report(graph, modules)]
    assert chains == ["pkg.a -> pkg.b -> pkg.sub.c -> pkg.a"]
    assert loads_by_name(modules["pkg.sub.c"][1], "pkg") == \
        [(5, "importlib.import_module(f'pkg.{name}')")]


# The edge: what may write to the terminal. payload/ runs inside the target environment,
# where its printed lines (JSON rows, markers) are its protocol with the engine.
EDGE = ("sdrecipe.cli", "sdrecipe.console", "sdrecipe.__main__", "sdrecipe.commands")


def terminal_writes(tree: ast.AST) -> list:
    """(line, code) of each print() call and each use of sys.stdout / sys.stderr."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "print":
            found.append((node.lineno, ast.unparse(node)[:80]))
        elif isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr") \
                and isinstance(node.value, ast.Name) and node.value.id == "sys":
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_only_the_cli_and_its_commands_write_to_the_terminal():
    _, modules = import_graph()
    offenders = [f"{path}:{line}: {code}" for name, (path, tree) in sorted(modules.items())
                 if not name.startswith(EDGE) and not name.startswith(f"{PACKAGE}.payload")
                 for line, code in terminal_writes(tree)]
    assert not offenders, "the engine logs (logging.getLogger('sdrecipe.<module>')) and " \
                          "reports progress (progress.Task); it never prints:\n  " \
                          + "\n  ".join(offenders)


def test_terminal_writes_are_found(tmp_path):
    tree = ast.parse("import sys\nprint('x')\nsys.stderr.write('y')\nlog.info('fine')\n")
    assert [line for line, _ in terminal_writes(tree)] == [2, 3]
