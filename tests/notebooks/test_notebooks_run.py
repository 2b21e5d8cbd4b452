"""Every notebook of notebooks/ runs top to bottom in its small mode (a cell error
fails the test), and the committed notebooks hold no outputs."""

import glob
import os

import nbformat
from nbclient import NotebookClient
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
EXPECTED = ["01_quickstart.ipynb", "02_checkpoints.ipynb", "03_symmetry.ipynb"]


def test_the_notebooks_are_there_without_outputs():
  assert [os.path.basename(p) for p in NOTEBOOKS] == EXPECTED
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, (
            f"{os.path.basename(path)} has stored outputs; clear them before committing")
    source = "\n".join(c.source for c in nb.cells)
    # Colab: installs from QLHS_REPO when qlhs_jax is missing; the test suite: small mode.
    assert "QLHS_REPO" in source and "QLHS_NOTEBOOK_SMALL" in source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_small_mode(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  env = {
      **os.environ,
      "QLHS_NOTEBOOK_SMALL": "1",
      "QLHS_NOTEBOOK_DIR": str(tmp_path),
      # The kernel imports this checkout's qlhs_jax, on one CPU device like Colab's CPU
      # runtime (conftest gives the test process 8).
      "PYTHONPATH": os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")]
                                             if p]),
      "XLA_FLAGS": "",
      "JAX_PLATFORMS": "cpu",
  }
  client = NotebookClient(nb, kernel_name="python3", timeout=300,
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=env)  # raises CellExecutionError, with the traceback, on any error
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
  assert f"qlhs_jax from {os.path.join(REPO, 'qlhs_jax')}" in text
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images, "every notebook plots something"
