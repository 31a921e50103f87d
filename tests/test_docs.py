"""The documentation runs as written: every fenced code block of README.md and docs/*.md.

- ```python blocks run in order, one namespace per page, in a private working directory that
  is a copy of the workflow (tests/workflow_runs.py);
- ```bash blocks run with bash (-e -u -o pipefail) in the same directory, in document order with
  the page's python blocks, with this interpreter's bin directory first on PATH (``tq``,
  ``snakemake``, ``python``) and the persistent cache as ``TQ_CACHE_DIR`` (the Wikipedia text);
- ```yaml blocks are sweep-config fragments: merged into config.yaml as ``--configfile`` merges
  them, then validated against workflow/schemas/config.schema.yaml.

A block that cannot run in a test (a long run, a cluster, a GPU) is preceded by
``<!-- not run: REASON -->``, and REASON says what covers it instead: "covered by" followed by
files of the repository that exist (``tests/test_x.py``, ``tests/test_x.py::name`` where
``name`` is defined in that file, ``.ci/run``, ``scripts/...``) or ``make test``. Any other
language, or a skip without such a cover, fails.

Also: docs/measurements.md is what benchmarks/measurements_page.py renders from
benchmarks/results/, relative links resolve, the README stays short, and no page points outside
the repository.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PERSISTENT_CACHE_DIR
from tests.workflow_runs import ROOT, copy_workflow

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = ("python", "bash", "yaml")
README_MAX_BYTES = 12_000
BLOCK_TIMEOUT_S = 300

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*not run:(.*?)-->", re.S)
# What a skip reason may name as its cover: a file of the repository (optionally ::a name it
# defines), or a make target of the Makefile.
COVER_PATH = re.compile(
    r"(?<![\w/.])((?:tests|scripts|benchmarks|workflow|profiles|config|\.ci)/[\w./-]*\w)(?:::(\w+))?"
)
COVER_MAKE = re.compile(r"\bmake (\w+)\b")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the first line of code
    language: str
    code: str
    skip: str | None  # the reason of a <!-- not run: --> comment just before it

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.language or 'no language'})"


def page_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, in order, each with the skip comment before it."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        skip = SKIP.fullmatch(before[-1].strip()) if before else None
        blocks.append(
            Block(
                page,
                text.count("\n", 0, match.start(2)) + 1,
                match.group(1).split()[0] if match.group(1).split() else "",
                match.group(2),
                skip.group(1).strip() if skip else None,
            )
        )
    return blocks


def cover_problem(reason: str) -> str | None:
    """Why a skip reason does not name what covers the block (None if it does)."""
    if not reason:
        return "the skip gives no reason"
    if "covered by" not in reason:
        return f"the reason {reason!r} does not say what covers the block ('covered by ...')"
    cover = reason.split("covered by", 1)[1]
    found = 0
    for path, name in COVER_PATH.findall(cover):
        target = ROOT / path
        if not target.exists():
            return f"{path} (named as its cover) does not exist"
        if name and not re.search(rf"\b(def|class) {name}\b", target.read_text()):
            return f"{path} defines no {name} (named as its cover)"
        found += 1
    makefile = (ROOT / "Makefile").read_text()
    for target in COVER_MAKE.findall(cover):
        if not re.search(rf"^{target}:", makefile, re.M):
            return f"the Makefile has no target {target!r} (named as its cover)"
        found += 1
    return None if found else f"the reason {reason!r} names no test, script or make target that covers it"


def test_every_block_runs_or_says_what_covers_it():
    problems = []
    for page in PAGES:
        blocks = page_blocks(page)
        for block in blocks:
            if block.skip is None:
                if block.language not in RUNNABLE:
                    problems.append(f"{block}: only {RUNNABLE} blocks run; mark it <!-- not run: ... -->")
            elif (problem := cover_problem(block.skip)) is not None:
                problems.append(f"{block}: {problem}")
        comments = len(SKIP.findall(page.read_text()))
        if comments != sum(block.skip is not None for block in blocks):
            problems.append(
                f"{page.relative_to(ROOT)}: a <!-- not run: --> comment is not right before a block"
            )
    assert not problems, "\n".join(problems)


def test_a_skip_must_name_an_existing_cover():
    assert cover_problem("") == "the skip gives no reason"
    assert "covered by" in cover_problem("slow")
    assert "does not exist" in cover_problem("slow, covered by tests/test_nothing_here.py")
    assert "defines no" in cover_problem("slow, covered by tests/test_docs.py::no_such_test")
    assert "no target" in cover_problem("slow, covered by make nothing")
    assert cover_problem("slow, covered by tests/test_docs.py::page_blocks and make test") is None


# ------------------------------------------------------------------------------ running blocks


def merged_config(fragment: dict) -> dict:
    """config.yaml with ``fragment`` merged in, as Snakemake merges a --configfile."""
    import yaml
    from snakemake.utils import update_config

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    update_config(config, fragment)
    return config


def check_yaml(block: Block) -> None:
    yaml = pytest.importorskip("yaml")
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("snakemake")
    fragment = yaml.safe_load(block.code)
    assert isinstance(fragment, dict), f"{block}: a config fragment is a mapping of sections"
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(merged_config(fragment)),
        key=lambda e: list(e.path),
    )
    assert not errors, f"{block}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors)


def run_bash(block: Block, workdir: Path) -> None:
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TQ_CACHE_DIR": str(PERSISTENT_CACHE_DIR),
        "PYTHONUNBUFFERED": "1",
    }
    result = subprocess.run(
        ["bash", "-e", "-u", "-o", "pipefail", "-c", block.code],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    assert result.returncode == 0, f"{block} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"


def run_python(block: Block, namespace: dict) -> None:
    # Padded so that a traceback names the page's own line numbers.
    code = compile("\n" * (block.line - 1) + block.code, str(block.page), "exec")
    exec(code, namespace)


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_the_page_runs_as_written(page, tmp_path, monkeypatch):
    blocks = [block for block in page_blocks(page) if block.skip is None and block.language in RUNNABLE]
    if not blocks:
        pytest.skip(f"{page.relative_to(ROOT)} has no block to run")
    workdir = copy_workflow(tmp_path / "work")
    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        if block.language == "python":
            run_python(block, namespace)
        elif block.language == "bash":
            run_bash(block, workdir)
        else:
            check_yaml(block)


# ------------------------------------------------------------------------------ the pages


def load_measurements_page():
    spec = importlib.util.spec_from_file_location(
        "measurements_page", ROOT / "benchmarks" / "measurements_page.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_measurements_page_is_what_the_results_render():
    module = load_measurements_page()
    committed = (ROOT / "docs" / "measurements.md").read_text()
    assert committed == module.render(), (
        "docs/measurements.md differs from benchmarks/results/*.json: run "
        ".venv/bin/python benchmarks/measurements_page.py"
    )


def test_the_measurements_page_shows_every_results_file():
    page = (ROOT / "docs" / "measurements.md").read_text()
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        assert f"`benchmarks/results/{path.name}`" in page


def test_a_new_results_file_appears_on_the_page(tmp_path):
    module = load_measurements_page()
    (tmp_path / "new_benchmark.json").write_text(
        '{"benchmark": "new_benchmark", "seconds": 1.5, "created": "2027-01-02"}'
    )
    page = module.render(tmp_path)
    assert "## new_benchmark" in page and "Date: 2027-01-02" in page and "| `seconds` | 1.50 |" in page
    assert module.main(["--check", "--results", str(tmp_path), "--out", str(tmp_path / "page.md")]) == 1


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md has {size} bytes; move reference material into docs/"


def test_no_page_points_outside_the_repository():
    for page in PAGES:
        text = page.read_text()
        for outside in ("/work/shared", "DESIGN.md", "shared design notes"):
            assert outside not in text, f"{page.relative_to(ROOT)} mentions {outside!r}"


def test_design_keeps_its_numbered_sections():
    """Code and tests cite "docs/design.md section N": the numbering must stay."""
    headings = re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "design.md").read_text(), re.M)
    assert headings == [str(n) for n in range(1, 12)]
