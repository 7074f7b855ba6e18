"""examples/chapter.ipynb runs top to bottom in a real Jupyter kernel in quick mode (TINYBN_QUICK=1: one epoch),
and its stored outputs, from a full run, come from the current code: the quick run's first cells, which train
nothing, print what the stored ones print."""
import os
from pathlib import Path

import pytest

from test_data import HAVE_DATA

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "chapter.ipynb"
UNTRAINED = 4       # the code cells after the set-up that train nothing: batch norm by hand, tinybn's, gradcheck, layers


def _printed(cell) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output["output_type"] == "stream")


@pytest.mark.skipif(not HAVE_DATA, reason="Debian's dataset-fashion-mnist is not installed")
def test_the_chapter_notebook_runs_in_quick_mode_and_its_stored_outputs_are_current(monkeypatch):
    stored = nbformat.read(NOTEBOOK, as_version=4)
    run = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("TINYBN_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.delenv("TINYBN_KERNELS", raising=False)
    nbclient.NotebookClient(run, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()   # raises if a cell does
    ran = [cell for cell in run.cells if cell.cell_type == "code"]
    kept = [cell for cell in stored.cells if cell.cell_type == "code"]
    assert "quick run: 1 epoch" in _printed(ran[0]) and "full run" in _printed(kept[0])
    for index in range(1, 1 + UNTRAINED):
        assert _printed(ran[index]) and _printed(ran[index]) == _printed(kept[index]), ran[index].source[:80]
    figures = sum(1 for cell in ran for output in cell.get("outputs", []) if "image/png" in output.get("data", {}))
    assert figures >= 9            # the training chart, the BN statistics, and every exercise's figure
    assert [cell.execution_count for cell in kept] == list(range(1, len(kept) + 1)), \
        "the stored notebook was not run top to bottom in one kernel: rerun it in full"
