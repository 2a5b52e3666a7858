"""The notebooks execute top to bottom (nbclient) on the tiny run's workdir and draw figures.

The workdir is conftest's session-wide ``tiny_run`` (the whole tiny pipeline, shared with the
other tests that read a finished run).
"""

import pathlib

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
pytest.importorskip("ipykernel")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[2] / "notebooks"

pytestmark = pytest.mark.xdist_group("tiny_run")


@pytest.fixture
def workdir(tiny_run) -> str:
    return str(tiny_run[0])


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


def test_explore_workdir_shows_every_view_and_the_results(workdir, monkeypatch):
    notebook = execute("explore_workdir.ipynb", workdir, monkeypatch)
    # 3 images x (CAMs, CVS before/after, masks) rows; an image without a present class
    # has no CVS row.
    assert len(outputs(notebook, "image/png")) >= 6
    assert "predicted here: pus" in text(notebook)
    tables = outputs(notebook, "text/markdown")
    assert tables and "segmenter pus (val)" in tables[-1] and "pseudo-mask ppmg" in tables[-1]


def test_training_curves_plot_every_model(workdir, monkeypatch):
    notebook = execute("training_curves.ipynb", workdir, monkeypatch)
    printed = text(notebook)
    cls_line = next(line for line in printed.splitlines() if line.startswith("cls -> "))
    for name in ("exact_match", "grad_norm", "learning_rate", "loss", "steps_per_sec"):
        assert name in cls_line.split(" -> ")[1].split(", "), (name, cls_line)
    assert "seg/pus -> " in printed
    models = printed.count(" -> ")
    assert len(outputs(notebook, "image/png")) == models + 1  # one per model, all losses
