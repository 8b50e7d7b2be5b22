"""notebooks/quickstart.ipynb runs top to bottom (nbclient, a fresh kernel) on the embedded tiny model."""

import os
import time
from pathlib import Path


NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes():
    import matplotlib  # noqa: F401  (the notebook plots; test dependencies must fail loudly, not skip)
    import nbclient
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env_before = os.environ.get("JAX_PLATFORMS")
    os.environ["JAX_PLATFORMS"] = "cpu"  # inherited by the kernel
    try:
        start = time.perf_counter()
        client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                         resources={"metadata": {"path": str(NOTEBOOK.parent)}})
        client.execute()
        elapsed = time.perf_counter() - start
    finally:
        if env_before is None:
            os.environ.pop("JAX_PLATFORMS", None)
        else:
            os.environ["JAX_PLATFORMS"] = env_before
    outputs = "\n".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "reconstruction:" in outputs and "with SGT" in outputs and "sigma: median" in outputs
    assert not any(out.get("output_type") == "error" for cell in notebook.cells for out in cell.get("outputs", []))
    print(f"notebook executed in {elapsed:.1f} s")
