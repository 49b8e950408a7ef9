"""Per-rule code hashes: the alloc_moe modules an entry module really uses, found with `ast`, and their hash.

A workflow rule names its entry module(s) (the CLI subcommand's module, or a `workflow/scripts/*.py` file) and
passes `code_hash(entries)` as a `params:` value, so an edit re-runs exactly the rules whose code it touches.

What counts as used (an over-approximation of what can execute, never an under-approximation for static imports):
- a module's module-level imports always run, and so do its parent packages' `__init__` (module level);
- imports inside a function or class run when that def is used: `import m` / `from pkg import m` / an entry module
  use all of m's defs, `from m import f` uses f and the defs f names in m (transitively), and names referenced by
  m's module-level statements (registries like `{"name": func}`) count as used whenever m is;
- a string constant "alloc_moe.<module>:<Name>" (a lazy registry entry, e.g. `backends.base.BACKENDS`) imports Name
  from that module, as `from alloc_moe.<module> import Name` would at the same place;
- relative and absolute imports of the package both count; `import io` is the standard library, not `alloc_moe.io`;
- package data: a string constant in a used module that names a non-Python subdirectory of the module's own
  package or of the package root (e.g. "configs" next to data/zoo.py, "schemas") adds every file under it.
Imports by computed name (`importlib.import_module(f"alloc_moe.{x}")`) are invisible: name such modules as entries.
"""

import ast
import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AllocMoeError

PACKAGE = "alloc_moe"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # alloc_moe/
ALL = None  # "every def of the module is used"
_LAZY = re.compile(PACKAGE + r"(\.\w+)+:\w+")  # "alloc_moe.backends.hf.backend:HFBackend"


@dataclass
class _Module:
    name: str
    path: Path
    is_package: bool
    top_imports: list = field(default_factory=list)  # [(module, names | ALL)] run at import time
    def_imports: dict = field(default_factory=dict)  # def name -> [(module, names | ALL)] run when the def is used
    def_refs: dict = field(default_factory=dict)  # def name -> names it references
    top_refs: set = field(default_factory=set)  # names module-level statements reference (always used)
    strings: set = field(default_factory=set)  # string constants (package data directories)


def _resolve(module: _Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _requests(module: _Module, node, exists) -> list:
    """(module, names | ALL) pairs an import statement asks for, inside the package only."""
    inside = lambda name: name == PACKAGE or name.startswith(PACKAGE + ".")  # noqa: E731
    if isinstance(node, ast.Import):
        return [(a.name, ALL) for a in node.names if inside(a.name)]
    target = _resolve(module, node)
    if not inside(target):
        return []
    out = []
    for alias in node.names:
        if alias.name == "*":
            out.append((target, ALL))
        elif exists(f"{target}.{alias.name}"):
            out += [(f"{target}.{alias.name}", ALL), (target, frozenset())]
        else:
            out.append((target, frozenset([alias.name])))
    return out


def _parse(name: str, path: Path, exists) -> _Module:
    module = _Module(name, path, path.name == "__init__.py")
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for stmt in tree.body:
        is_def = isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        imports = module.def_imports.setdefault(stmt.name, []) if is_def else module.top_imports
        refs = module.def_refs.setdefault(stmt.name, set()) if is_def else module.top_refs
        for node in ast.walk(stmt):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imports += _requests(module, node, exists)
            elif isinstance(node, ast.Name):
                refs.add(node.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                module.strings.add(node.value)
                if _LAZY.fullmatch(node.value) and exists(node.value.partition(":")[0]):
                    target, _, attr = node.value.partition(":")
                    imports.append((target, frozenset([attr])))
    return module


class _Package:
    """The parsed modules of one package directory (parsed lazily, once)."""

    def __init__(self, package_dir: Path):
        self.dir = Path(package_dir)
        self.modules: dict[str, _Module] = {}

    def path(self, name: str) -> Path | None:
        rel = Path(*name.split(".")[1:])
        for cand in (self.dir / rel / "__init__.py", (self.dir / rel).with_suffix(".py")):
            if cand.is_file() and name.split(".")[0] == PACKAGE:
                return cand
        return None

    def get(self, name: str) -> _Module:
        if name not in self.modules:
            self.modules[name] = _parse(name, self.path(name), lambda n: self.path(n) is not None)
        return self.modules[name]

    def data_files(self, modules: list[str]) -> list[Path]:
        """Files under the non-Python folders that string constants of `modules` name, next to the module or at
        the package root (e.g. "configs" next to data/zoo.py, "schemas")."""
        dirs = set()
        for m in modules:
            for base in {self.path(m).parent, self.dir}:
                dirs |= {base / s for s in self.get(m).strings if s.replace("-", "_").isidentifier()
                         and (base / s).is_dir() and not (base / s / "__init__.py").exists()
                         and not s.startswith((".", "_"))}
        return sorted(p for d in dirs for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _walk(pkg: _Package, entries: list[tuple[str, object]]) -> dict[str, set | None]:
    """Worklist over (module, names): returns module -> used defs (ALL = every def)."""
    used: dict[str, set | None] = {}
    work = list(entries)
    while work:
        name, names = work.pop()
        if pkg.path(name) is None:
            continue  # an attribute imported from a module that is not a file (e.g. a re-exported name)
        module = pkg.get(name)
        first = name not in used
        before = used.get(name, set())
        if before is ALL:
            continue
        wanted = set(module.def_imports) if names is ALL else set(names)
        if first:
            wanted |= module.top_refs
            parts = name.split(".")
            work += [(".".join(parts[:i]), frozenset()) for i in range(1, len(parts))]
            work += module.top_imports
        wanted = _referenced(module, wanted)
        new = wanted - before
        if not first and not new:
            continue
        used[name] = ALL if names is ALL else before | wanted
        for d in new & set(module.def_imports):
            work += module.def_imports[d]
    return used


def _referenced(module: _Module, names: set) -> set:
    """`names` plus the module's defs they reference, transitively."""
    out, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n in out:
            continue
        out.add(n)
        todo += [r for r in module.def_refs.get(n, ()) if r in module.def_refs]
    return out


def _entries(pkg: _Package, entry_modules: list[str]) -> tuple[list, list[Path]]:
    """Entry modules as worklist items; `.py` paths outside the package (workflow scripts) are parsed as entries."""
    items, scripts = [], []
    for entry in entry_modules:
        if entry.endswith(".py"):
            path = Path(entry)
            if not path.is_file():
                raise AllocMoeError(f"entry script {entry} does not exist")
            script = _parse("__script__", path, lambda n: pkg.path(n) is not None)
            items += script.top_imports + [r for imps in script.def_imports.values() for r in imps]
            scripts.append(path)
        elif pkg.path(entry) is None:
            raise AllocMoeError(f"entry module {entry!r} is not a module of {pkg.dir}; give e.g. 'alloc_moe.report.plots' "
                                "or a path to a .py script")
        else:
            items.append((entry, ALL))
    return items, scripts


def _closure(entry_modules: tuple[str, ...], package_dir: Path) -> tuple[tuple[str, ...], tuple[Path, ...]]:
    """Cached per state of the package's sources, so a Snakefile naming the same entries in many rules parses once."""
    stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(package_dir.rglob("*.py")))
    return _closure_cached(entry_modules, package_dir, stamp)


@functools.lru_cache(maxsize=4)
def _package(package_dir, stamp) -> _Package:
    """One parse of the package per state of its sources, shared by every rule's closure (each rule names other
    entries, but their closures overlap: parsing per rule was most of the workflow's start-up)."""
    return _Package(package_dir)


@functools.lru_cache(maxsize=256)
def _closure_cached(entry_modules, package_dir, stamp) -> tuple[tuple[str, ...], tuple[Path, ...]]:
    pkg = _package(package_dir, stamp)
    items, scripts = _entries(pkg, list(entry_modules))
    used = _walk(pkg, items)
    modules = tuple(sorted(used))
    files = [pkg.path(m) for m in modules] + pkg.data_files(modules)
    return modules, tuple(scripts) + tuple(sorted(set(files)))


def module_closure(entry_modules: list[str], package_dir: str | Path = PACKAGE_DIR) -> list[str]:
    """The alloc_moe modules the entries import, transitively (sorted dotted names, entries included)."""
    return list(_closure(tuple(entry_modules), Path(package_dir).resolve())[0])


def closure_files(entry_modules: list[str], package_dir: str | Path = PACKAGE_DIR) -> list[Path]:
    """Source files of the closure plus the package data it names and the entry scripts."""
    return list(_closure(tuple(entry_modules), Path(package_dir).resolve())[1])


def code_hash(entry_modules: list[str], package_dir: str | Path = PACKAGE_DIR) -> str:
    """16 hex digits of sha256 over the closure's files (package-relative name and bytes, in sorted order)."""
    package_dir = Path(package_dir).resolve()
    h = hashlib.sha256()
    for path in closure_files(entry_modules, package_dir):
        rel = path.relative_to(package_dir.parent) if path.is_relative_to(package_dir.parent) else path.name
        h.update(str(rel).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
