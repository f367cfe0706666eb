"""Every notebook runs top to bottom in smoke mode, ships without outputs, and uses the public API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
# Inside `if SMOKE:` notebooks may reach the fixtures; everywhere else only top-level desktune names.
_PRIVATE_IMPORT = re.compile(r"^\s*(from|import)\s+desktune\.(?!fixtures\b)", re.M)


def test_the_four_notebooks_exist():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_public(path):
    book = nbformat.read(path, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "outputs not stripped"
    first = code[0]
    assert "parameters" in first.metadata.get("tags", []) and "SMOKE = False" in first.source
    assert "MODEL = " in first.source
    for cell in code:
        assert not _PRIVATE_IMPORT.search(cell.source), f"non-public import in: {cell.source[:80]}"
    assert any("TrainingProgress.attach" in c.source for c in code)  # live bar while training
    assert any("plot_loss(" in c.source for c in code)  # loss curve at the end


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    book = nbformat.read(path, as_version=4)
    first = next(c for c in book.cells if c.cell_type == "code")
    first.source = first.source.replace("SMOKE = False", "SMOKE = True")
    client = nbclient.NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    outputs = "".join(
        o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
    )
    images = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "no loss curve was drawn"
    assert "Traceback" not in outputs
