"""The notebooks execute top to bottom (nbclient) on a tiny run's workdir and draw figures."""

import pathlib

import nbformat
import pytest

from tiny_run import tiny_workdir  # noqa: F401  (the shared session fixture)

nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
pytest.importorskip("ipykernel")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, workdir: str, monkeypatch) -> nbformat.NotebookNode:
    """Runs notebook ``name`` in a fresh kernel whose ``PMM_WORKDIR`` is ``workdir``."""
    monkeypatch.setenv("PMM_WORKDIR", workdir)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS.parent)}}).execute()
    return notebook


def outputs(notebook, kind: str) -> list:
    return [o["data"][kind] for cell in notebook.cells for o in cell.get("outputs", [])
            if kind in o.get("data", {})]


def text(notebook) -> str:
    return "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))


def test_explore_workdir_shows_every_view_and_the_results(tiny_workdir, monkeypatch):
    notebook = execute("explore_workdir.ipynb", tiny_workdir, monkeypatch)
    # 3 images x (CAMs, CVS before/after, masks) rows; an image without a present class
    # has no CVS row.
    assert len(outputs(notebook, "image/png")) >= 6
    assert "predicted here: pus" in text(notebook)
    tables = outputs(notebook, "text/markdown")
    assert tables and "segmenter pus (val)" in tables[-1] and "pseudo-mask ppmg" in tables[-1]


def test_training_curves_plot_every_model(tiny_workdir, monkeypatch):
    notebook = execute("training_curves.ipynb", tiny_workdir, monkeypatch)
    printed = text(notebook)
    assert "cls -> exact_match, learning_rate, loss, steps_per_sec" in printed
    assert "seg/pus -> " in printed
    assert len(outputs(notebook, "image/png")) == 3  # cls, seg/pus, all losses
