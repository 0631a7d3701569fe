"""examples/training_lab.ipynb: committed with the outputs of a real run, and executed here top
to bottom on a short budget (its last cell asserts that the last rung beats the bigram)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "training_lab.ipynb"
SHORT = 60  # steps per rung: a minute or two on a 2-core CPU


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def printed(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_the_notebook_is_committed_with_the_outputs_of_a_real_run():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = code_cells(nb)
    assert all(c.execution_count for c in cells), "run every cell before committing"
    assert not any(o.output_type == "error" for c in cells for o in c.outputs)
    assert "500 steps per rung" in printed(cells[0])  # the notebook's own budget, not the tests'
    assert any("image/png" in o.get("data", {}) for c in cells for o in c.outputs)  # the plot
    rows = {ln.split()[0]: float(ln.split()[2]) for c in cells for ln in printed(c).splitlines()
            if ln.split()[:1] and ln.split()[0] in ("bigram", "layernorm") and len(ln.split()) > 3}
    assert rows["layernorm"] < rows["bigram"]


def test_the_notebook_runs_top_to_bottom_on_a_short_budget(war_and_peace, monkeypatch):
    monkeypatch.setenv("GPTLAB_LAB_STEPS", str(SHORT))
    monkeypatch.setenv("GPTLAB_DATA_DIR", str(war_and_peace.parent))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # small models: robust on a busy machine
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # a failing cell (the last one asserts the last rung beats the bigram) raises here
    NotebookClient(nb, timeout=170, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    cells = code_cells(nb)
    assert f"{SHORT} steps per rung" in printed(cells[0])
    for rung in ["bigram", "head", "heads", "mlp", "residual", "layernorm"]:
        assert any(printed(c).startswith(f"{rung}: ") for c in cells), rung
