"""Static checks of the code itself: the layers of STYLE.md hold, and mypy agrees
with the annotations."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    assert path, f"{name} is not installed (pip install -e '.[test]')"
    return path


def test_lower_layers_never_import_higher_ones():
    done = subprocess.run([_tool("lint-imports"), str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 kept, 0 broken" in done.stdout


def test_the_package_type_checks():
    done = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# -- the shape of the code: packages, modules and classes a maintainer can hold -----

SRC = ROOT / "src" / "podpipe"
MOST_MODULES, MOST_LINES, MOST_ATTRIBUTES = 12, 450, 15


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__)."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The podpipe modules `name` imports anywhere in it: at the top, inside functions
    and under TYPE_CHECKING alike (`from a.b import c`: a.b.c if it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, if there is any (depth first, the path kept)."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_anywhere_counting_type_checking_and_function_imports():
    modules = _modules()
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_package_holds_more_than_a_dozen_modules():
    crowded = {}
    for package in [p for p in SRC.rglob("__init__.py")]:
        count = sum(1 for p in package.parent.glob("*.py") if p.name != "__init__.py")
        if count > MOST_MODULES:
            crowded[str(package.parent.relative_to(SRC))] = count
    assert not crowded, crowded


def test_no_module_is_longer_than_a_screenful_of_screens():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MOST_LINES}
    assert not long, long


def _attributes(cls: ast.ClassDef) -> set[str]:
    """What a class's instances hold: fields declared in its body (a dataclass, a
    msgspec Struct) and every `self.NAME = ...` in its methods."""
    names = {n.target.id for n in cls.body
             if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    for method in (n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(method):
            targets = (node.targets if isinstance(node, ast.Assign) else
                       [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
            for target in targets:
                for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                    if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                            and t.value.id == "self"):
                        names.add(t.attr)
    return names


def test_no_class_holds_more_than_fifteen_attributes():
    crowded = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and len(found := _attributes(node)) > MOST_ATTRIBUTES:
                # a record of the status file is its schema, field for field
                if not any(getattr(b, "attr", getattr(b, "id", "")) == "_Record"
                           for b in node.bases):
                    crowded[f"{path.relative_to(SRC)}:{node.name}"] = len(found)
    assert not crowded, crowded


POLICIES = ("grants", "jam", "lifecycle", "rework", "workers", "state", "resume")
MUTATORS = {"append", "extend", "insert", "add", "discard", "remove", "pop", "popitem",
            "clear", "update", "setdefault", "sort"}


def _writes(tree: ast.AST) -> list[str]:
    """Where code changes state it does not own: an attribute (but its own, `self.x`)
    or an item assigned or deleted, or a container reached through one changed in
    place (`run.ready[n].pop()`; a list of its own, a bare name, it may build)."""
    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(t, (ast.Attribute, ast.Subscript)) and not _own(t):
                    found.append(f"line {node.lineno}: {ast.unparse(t)}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in MUTATORS
                and isinstance(node.func.value, (ast.Attribute, ast.Subscript))):
            found.append(f"line {node.lineno}: {ast.unparse(node.func)}()")
    return found


def _own(target: ast.expr) -> bool:
    """`self.x = ...`: a class setting its own state."""
    return isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
        and target.value.id == "self"


@pytest.mark.parametrize("policy", POLICIES)
def test_the_engines_policies_change_the_run_only_through_the_ledgers_operations(policy):
    tree = ast.parse((SRC / "engine" / f"{policy}.py").read_text())
    assert _writes(tree) == []


def test_a_write_to_the_ledger_behind_its_back_is_found():
    tree = ast.parse("def f(run, agent, seen):\n    run.ready[n].pop(0)\n"
                     "    agent.status = 1\n    del run.done[n]\n    seen.append(1)\n"
                     "    run.pool.settled += 1\n")
    assert [w.split(": ")[1] for w in _writes(tree)] == [
        "agent.status", "run.done[n]", "run.pool.settled", "run.ready[n].pop()"]


def test_what_run_imports_before_forking_its_fork_server_stays_light():
    """`podpipe run` forks its fork server first thing (`launcher.warm`): the launcher
    must not pull in the conductor, the engine or pyarrow (they once cost 0.18 s
    before the fork, and Q1 at 5,000-row batches 7%)."""
    probe = ("import sys; import podpipe.runtime.runs.launcher; print(sorted(m for m in "
             "sys.modules if m.startswith(('podpipe.runtime.conductor', 'podpipe.engine', "
             "'pyarrow', 'rich'))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
