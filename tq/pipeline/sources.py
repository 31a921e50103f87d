"""The code a pipeline job runs: the tq modules its script uses, and a hash over their sources.

Snakemake re-runs a job when its rule's code changes but does not follow the modules a script
imports, so each rule puts :func:`code_hash` of its script into its params. The modules counted
are the ones the job really loads:

- the tq modules the script imports (at any depth of its code, ``from tq import Name`` through
  tq's lazy exports);
- everything those import, followed through tq's import graph as ``grimp`` builds it (the
  library import-linter uses; imports under ``if TYPE_CHECKING:`` are left out, they never run);
- modules loaded by name, ``importlib.import_module("tq.kernels.cuda")``: any string in a
  module's code that names a tq module (``"tq.engines.onnx"``, or ``"tq.engines.onnx:OnnxRunner"``
  for a name in it), or an f-string that starts with ``"tq.kernels."`` (every module under it);
- the parent packages of each (their ``__init__.py`` runs first).

So an edit to the cache re-runs the jobs that quantize and nothing that only exports a model.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

import grimp

import tq

PACKAGE = "tq"


@functools.cache
def _graph() -> grimp.ImportGraph:
    """tq's import graph (built once per process)."""
    return grimp.build_graph(PACKAGE, cache_dir=None, exclude_type_checking_imports=True)


def package_root() -> Path:
    """The directory that holds the ``tq`` package being graphed (its parent)."""
    return Path(tq.__file__).resolve().parent.parent


def module_file(name: str) -> Path:
    """The source file of tq module ``name`` (a package's ``__init__.py``)."""
    path = package_root().joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name | ast.Attribute) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_names(tree: ast.AST, package: str) -> set[str]:
    """Dotted names a module's import statements name (``from a import b`` gives a and a.b),
    left out those under ``if TYPE_CHECKING:``; ``package`` resolves relative imports."""
    found: set[str] = set()
    skipped = {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.If) and _is_type_checking(stmt)
               for node in ast.walk(stmt)}  # fmt: skip
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _names_loaded_by_name(tree: ast.AST, modules: Iterable[str]) -> set[str]:
    """tq modules a module's code names in strings: ``"tq.kernels.cuda"`` (or
    ``"tq.kernels.cuda:name"``), or every module under ``tq.kernels`` for an f-string that starts
    with ``"tq.kernels."``."""
    modules = set(modules)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            name = node.value.partition(":")[0]  # "tq.engines.onnx:OnnxRunner" names its module
            if name in modules:
                found.add(name)
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            prefix = str(node.values[0].value)
            if prefix.startswith(f"{PACKAGE}.") and prefix.endswith("."):
                found.update(name for name in modules if name.startswith(prefix))
    return found


@functools.cache
def _loaded_by_name(module: str) -> frozenset[str]:
    """The tq modules ``module`` loads by name (:func:`_names_loaded_by_name`); none for the
    root package, whose lazy exports are resolved where a script imports them."""
    if module == PACKAGE:
        return frozenset()
    tree = ast.parse(module_file(module).read_text())
    return frozenset(_names_loaded_by_name(tree, _graph().modules))


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def script_modules(script: Path) -> set[str]:
    """The tq modules a script imports itself (``from tq import Name`` resolved through the
    package's lazy exports); raises ValueError for a name tq does not have."""
    tree = ast.parse(Path(script).read_text())
    modules = _graph().modules
    found: set[str] = set()
    for name in _imported_names(tree, package=""):
        if name in modules:
            found.add(name)
        elif name.startswith(f"{PACKAGE}."):
            parent, _, attribute = name.rpartition(".")
            if parent == PACKAGE and attribute in tq._EXPORTS:
                found.add(tq._EXPORTS[attribute])
            elif parent not in modules or (parent == PACKAGE and not hasattr(tq, attribute)):
                raise ValueError(f"{script}: imports {name}, which tq does not have")
    return found


def code_modules(script: Path) -> list[str]:
    """Every tq module a job running ``script`` loads, sorted (see the module docstring)."""
    graph = _graph()
    pending = sorted(script_modules(script))
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending.extend(graph.find_modules_directly_imported_by(name))
        pending.extend(_loaded_by_name(name))
        pending.extend(_parents(name))
    return sorted(seen)


def code_hash(script: Path) -> str:
    """SHA-256 over the path and source of every module of :func:`code_modules`."""
    digest = hashlib.sha256()
    root = package_root()
    for name in code_modules(script):
        path = module_file(name)
        digest.update(f"{path.relative_to(root)}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
