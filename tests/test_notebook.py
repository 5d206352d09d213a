"""Execute notebooks/quickstart.ipynb end to end on the CPU with a small token budget."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_notebook_structure():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # A clean notebook: no stored outputs, and one parameters cell to inject into.
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    assert 'find_spec("reset_jax") is None' in code[0].source  # the guarded install


@pytest.mark.slow
def test_notebook_executes_on_cpu(tmp_path, monkeypatch):
    # The kernel inherits this environment: a short generation, and no GPU even if
    # the machine has one (the speed section must skip cleanly).
    monkeypatch.setenv("RESET_JAX_NB_MAX_NEW_TOKENS", "24")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "tokens/s" in text and "at T_high" in text
    assert "No GPU: skipping the kernel speed table." in text
    assert "step 0:" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the entropy trace
