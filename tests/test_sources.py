"""tq.pipeline.sources: the tq modules a pipeline script runs (the rules' code hashes). The
re-runs they cause are tested on the quick sweep in tests/test_pipeline.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tq.pipeline.sources import code_hash, code_modules, script_modules

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "workflow" / "scripts"


def _script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "script.py"
    path.write_text(text)
    return path


def test_a_script_runs_what_it_imports_and_their_imports(tmp_path):
    modules = code_modules(_script(tmp_path, "from tq.data.corpus import corpus_text\n"))
    assert {"tq", "tq.data", "tq.data.corpus", "tq.core", "tq.core.fileio"} <= set(modules)
    assert not [name for name in modules if name.startswith(("tq.cache", "tq.engines", "tq.models"))]


def test_lazy_exports_of_the_package_resolve_to_their_modules(tmp_path):
    assert script_modules(_script(tmp_path, "from tq import TurboQuantMSE, KvTrace\n")) == {
        "tq",
        "tq.quant.turboquant",
        "tq.data.trace",
    }


def test_imports_for_annotations_only_are_left_out(tmp_path):
    text = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tq.cache.kvcache import X\n"
    assert script_modules(_script(tmp_path, text)) == set()


def test_an_import_of_no_tq_module_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"tq\.no_such_module"):
        script_modules(_script(tmp_path, "import tq.no_such_module\n"))


def test_modules_loaded_by_name_are_followed(tmp_path):
    """Every ``importlib.import_module("tq....")`` in tq (a kernel backend, a lazily loaded engine)
    is in the code of the module that calls it."""
    for path in sorted((ROOT / "tq").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            loads = (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            )
            if loads and node.args[0].value.startswith("tq."):
                modules = code_modules(_script(tmp_path, f"import {name}\n"))
                assert node.args[0].value in modules, (name, node.args[0].value)


def test_every_workflow_script_hashes_its_tq_code():
    """The workflow's scripts import only tq modules that exist, and each one's code covers the
    task it runs and nothing of an unrelated layer."""
    for path in SCRIPTS.glob("*.py"):
        assert len(code_hash(path)) == 64
    assert "tq.tasks.perplexity" in code_modules(SCRIPTS / "perplexity.py")
    corpus = code_modules(SCRIPTS / "corpus.py")
    assert "tq.data.corpus" in corpus and not [name for name in corpus if name.startswith("tq.engines")]
