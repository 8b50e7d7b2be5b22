"""notebooks/quickstart.ipynb runs top to bottom (nbclient, a fresh kernel) on the embedded tiny model, shows its
figures inline, and is committed with the outputs of such a run."""

import os
import time
from pathlib import Path

import pytest


NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _check_outputs(notebook):
    """What a reader must see: the reconstructions, the generations, the sigma numbers, and every plotting
    cell's figure as an inline PNG (a non-inline backend such as Agg draws nothing into the notebook)."""
    cells = _code_cells(notebook)
    outputs = [out for cell in cells for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    text = "\n".join(out.get("text", "") for out in outputs)
    assert "reconstruction:" in text and "with SGT" in text and "sigma: median" in text
    assert "SGT training summary" in text
    plotting = [cell for cell in cells if "plt." in cell.source]
    assert plotting, "the notebook is expected to plot (the sigma histogram)"
    for cell in plotting:
        images = [out for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
        assert images, f"no inline figure from the cell:\n{cell.source[:200]}"
    return sum("image/png" in out.get("data", {}) for out in outputs)


def test_committed_notebook_has_the_outputs_of_a_run():
    """A reader browsing the repository sees the results without running anything."""
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cells = _code_cells(notebook)
    # Executed top to bottom in one kernel: every code cell ran, in order.
    assert [cell.get("execution_count") for cell in cells] == list(range(1, len(cells) + 1))
    assert _check_outputs(notebook) >= 1


@pytest.mark.slow
def test_quickstart_notebook_executes():
    import matplotlib  # noqa: F401  (the notebook plots; test dependencies must fail loudly, not skip)
    import nbclient
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in _code_cells(notebook):  # the committed outputs must not satisfy the checks below
        cell.outputs, cell.execution_count = [], None
    env_before = os.environ.get("JAX_PLATFORMS")
    os.environ["JAX_PLATFORMS"] = "cpu"  # inherited by the kernel
    try:
        start = time.perf_counter()
        client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(NOTEBOOK.parent)}})
        client.execute()
        elapsed = time.perf_counter() - start
    finally:
        if env_before is None:
            os.environ.pop("JAX_PLATFORMS", None)
        else:
            os.environ["JAX_PLATFORMS"] = env_before
    images = _check_outputs(notebook)
    print(f"notebook executed in {elapsed:.1f} s, {images} inline figure(s)")
