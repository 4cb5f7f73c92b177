"""The exploration notebook executes top to bottom (on the tiny config, training in place on the shared shards)."""
import os

import nbformat
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "explore.ipynb")


def test_explore_notebook_executes(tiny_shards, tmp_path, monkeypatch):
  monkeypatch.setenv("E2ETTS_SHARDS", tiny_shards)
  monkeypatch.setenv("E2ETTS_NOTEBOOK_STEPS", "8")
  monkeypatch.setenv("E2ETTS_MANIFEST", os.path.join(os.path.dirname(tiny_shards), "corpus", "manifest.jsonl"))
  monkeypatch.delenv("E2ETTS_WORKDIR", raising=False)
  monkeypatch.setenv("TMPDIR", str(tmp_path))   # the notebook's scratch folder goes with the test's, not into /tmp
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "tokens at 25 Hz" in outputs
  assert "real-time factor" in outputs
  assert "WER %:" in outputs
  images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {}))
  kinds = [(i, o.get("output_type"), sorted(o.get("data", {}))) for i, c in enumerate(nb.cells)
           if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") != "stream"]
  assert images >= 3, kinds   # token plot, mel panels, loss curves
  assert len(list(tmp_path.glob("e2etts_nb_*"))) == 1
