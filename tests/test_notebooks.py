"""The teaching notebooks in notebooks/: each runs top to bottom on the toy models, offline, and
the committed files carry no outputs.

Executing a notebook is docs/run_notebooks.py's job (a fresh kernel of this interpreter, a guard
that makes any connection leaving the machine raise): the executed copy is written to
build/notebooks/, where the documentation site (tests/test_docs_site.py, ``make docs``) renders
it from, so the notebooks run once per test session. A copy made in THIS session (by this test
or by the docs build on the other xdist worker) is reused; an older one is executed again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _load_runner():
    spec = importlib.util.spec_from_file_location("corelens_docs_run_notebooks",
                                                  ROOT / "docs" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


runner = _load_runner()
NO_NETWORK = runner.NO_NETWORK  # the guard cell, run first in every kernel
execute = runner.execute  # execute(path, workdir) -> (executed notebook, seconds)


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    for expected in ("01_quickstart.ipynb", "02_core_heads.ipynb", "03_causal.ipynb",
                     "04_acceleration.ipynb", "05_circuits.ipynb", "06_video.ipynb",
                     "07_saes.ipynb"):
        assert expected in names
    assert [p.name for p in runner.NOTEBOOKS] == names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebooks_have_no_outputs(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs: clear them"
        assert cell.get("execution_count") is None, f"{path.name} cell {i} has a count"
    # no kernel / editor state beyond what the notebook needs
    assert set(nb["metadata"]) <= {"kernelspec", "language_info"}, nb["metadata"].keys()


def test_output_checks_catch_remote_html_errors_and_unrendered_figures():
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [
        nbformat.v4.new_output("display_data", {
            "text/html": '<script src="https://cdn.example/x.js"></script>'}),
        nbformat.v4.new_output("execute_result", {"text/plain": "<Figure size 640x480>"},
                               execution_count=1),
        nbformat.v4.new_output("error", ename="ValueError", evalue="boom", traceback=[]),
    ]
    nb.cells = [cell]
    found = runner.problems(nb)
    assert len(found) == 3, found
    cell.outputs = [nbformat.v4.new_output("display_data", {
        "text/html": '<img src="data:image/png;base64,AAAA">', "image/png": "AAAA",
        "text/plain": "<Figure size 640x480>"})]
    assert runner.problems(nb) == []


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_offline(path):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # raises on a cell error, on HTML that loads from another host (views are self-contained)
    # and on a figure that printed its repr instead of rendering (no inline backend)
    nb = runner.ensure_executed(path, run=os.environ["CORELENS_TEST_RUN"], require_run=True)
    print(f"{path.name}: {nb.metadata['corelens']['seconds']} s")
    assert runner.problems(nb) == []
    assert runner.GUARD_ID not in [c.get("id") for c in nb.cells]  # the copy is the notebook
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "not every cell ran"
