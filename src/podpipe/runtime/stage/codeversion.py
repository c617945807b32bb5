"""What a Python stage's version digests: the text of its own definition (the function
or class, decorators included) and of every module-level definition it refers to,
followed by name within its module and into the project's own modules it imports
from — not the rest of the module. Editing an unrelated function leaves a stage's
version as it was; editing a helper it calls changes it.

The rule, documented in docs/spec.md ("Versions"):
- a name a reached definition uses (any identifier in it) that the module binds at
  top level (`def`, `class`, an assignment, an import, a definition inside a
  top-level `if`/`try`) brings that statement in, and so on;
- `from M import a` (and `import M`, `M.a`) where M is the project's own — its file
  outside the interpreter's standard library and installed packages — is followed
  into M (`a` by name; a plain `import M` brings M's whole text); an installed
  library is not (its version is the environment's, not the stage's);
- what it cannot see: code reached dynamically (`getattr`, `importlib`, strings),
  `from M import *`, and data files the code reads. Say `version:` on the stage to
  version it by hand."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _Module:
    """One module's top-level statements, by the names they bind."""

    name: str
    path: Path
    lines: list[str]
    binds: dict[str, ast.stmt] = field(default_factory=dict)

    def text(self, statement: ast.stmt) -> str:
        first = min([statement.lineno] + [d.lineno for d in
                                           getattr(statement, "decorator_list", [])])
        return "".join(self.lines[first - 1:statement.end_lineno])


def _installed() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    return tuple(Path(paths[key]).resolve() for key in ("stdlib", "platstdlib",
                                                         "purelib", "platlib")
                 if key in paths)


def _module_file(name: str, anywhere: bool) -> Path | None:
    """The file of module `name`, if it is Python source and (unless `anywhere`,
    as for the stage's own module) the project's own, not the standard library's
    or an installed package's."""
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None)
    if origin is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        origin = spec.origin if spec is not None else None
    if not origin or not origin.endswith(".py"):
        return None
    path = Path(origin).resolve()
    if not anywhere and any(path.is_relative_to(root) for root in _installed()):
        return None
    return path


def _bound(statement: ast.stmt) -> list[str]:
    """The top-level names a statement binds."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [statement.name]
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).partition(".")[0] for a in statement.names
                if a.name != "*"]
    if isinstance(statement, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    if isinstance(statement, (ast.If, ast.Try, ast.With)):
        return [name for child in ast.iter_child_nodes(statement)
                if isinstance(child, ast.stmt) for name in _bound(child)]
    return []


class CodeVersion:
    """Digests callables' code; parsed modules are kept for the next callable."""

    def __init__(self) -> None:
        self.modules: dict[str, _Module | None] = {}

    def _parsed(self, name: str, anywhere: bool = False) -> _Module | None:
        if name not in self.modules:
            self.modules[name] = None
            path = _module_file(name, anywhere)
            if path is not None:
                try:
                    text = path.read_text()
                    tree = ast.parse(text)
                except (OSError, SyntaxError, UnicodeDecodeError):
                    return None
                module = _Module(name, path, text.splitlines(keepends=True))
                for statement in tree.body:
                    for bound in _bound(statement):
                        module.binds[bound] = statement
                self.modules[name] = module
        return self.modules[name]

    def digest(self, module: str, name: str) -> str | None:
        """A digest of `module:name`'s code and what it reaches, or None when its
        module's source cannot be read (then the caller versions it otherwise)."""
        if self._parsed(module, anywhere=True) is None:
            return None
        digest = hashlib.sha256()
        reached: set[tuple[str, int]] = set()
        whole: set[str] = set()
        todo = [(module, name)]
        while todo:
            where, wanted = todo.pop()
            parsed = self._parsed(where)
            statement = parsed.binds.get(wanted) if parsed is not None else None
            if parsed is None or statement is None or (where, id(statement)) in reached:
                continue
            reached.add((where, id(statement)))
            digest.update(f"{where}\0{parsed.text(statement)}\0".encode())
            if isinstance(statement, (ast.Import, ast.ImportFrom)):
                todo.extend(self._imported(parsed, statement, wanted, whole, digest))
                continue  # (a name it leads to, if any; a whole module is digested there)
            used = {n.id for n in ast.walk(statement) if isinstance(n, ast.Name)}
            todo.extend((where, used_name) for used_name in sorted(used))
        return digest.hexdigest()

    def _imported(self, parsed: _Module, statement: ast.Import | ast.ImportFrom,
                  wanted: str, whole: set[str], digest: "hashlib._Hash"
                  ) -> list[tuple[str, str]]:
        """Where an import statement's name `wanted` leads: a name in a project's
        module (`from M import a`), or M's whole text (`import M`)."""
        if isinstance(statement, ast.ImportFrom):
            base = "." * statement.level + (statement.module or "")
            try:
                source = importlib.util.resolve_name(base, parsed.name.rpartition(".")[0]
                                                     if statement.level else None)
            except (ImportError, ValueError):
                return []
            for alias in statement.names:
                if (alias.asname or alias.name) == wanted:
                    if self._parsed(f"{source}.{alias.name}") is None:
                        return [(source, alias.name)]
                    self._whole(f"{source}.{alias.name}", whole, digest)  # a submodule
            return []
        for alias in statement.names:
            if (alias.asname or alias.name).partition(".")[0] == wanted:
                self._whole(alias.name, whole, digest)
        return []

    def _whole(self, name: str, whole: set[str], digest: "hashlib._Hash") -> None:
        """All of the project's module `name` into `digest`, once."""
        parsed = self._parsed(name)
        if parsed is not None and name not in whole:
            whole.add(name)
            digest.update(f"{name}\0{''.join(parsed.lines)}\0".encode())
