"""Every example notebook runs top to bottom in a real Jupyter kernel (nbclient, headless) without errors.

The kernel is this interpreter (the project's .venv), registered as a kernelspec in a temporary
JUPYTER_PATH, so the test neither needs nor touches a user's Jupyter setup. The notebooks run on
the default trained model; while it is not shipped (a fresh checkout before training) they run on
a random model of the same shape, so that the notebooks' code is still exercised.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from workbench.runtime.session import DEFAULT_MODEL, PROJECT_ROOT

NOTEBOOKS = PROJECT_ROOT / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
KERNEL = "workbench-test"
CELL_TIMEOUT_S = 240

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, request):
    """A kernelspec for sys.executable in a temporary JUPYTER_PATH; env for the kernel process."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    env = {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    if not (DEFAULT_MODEL / "config.json").exists():
        env["WORKBENCH_MODEL"] = str(_random_default_shape_model(root / "llama"))
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "workbench (test)", "language": "python", "env": env,
    }))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(root))
    mp.setenv("JUPYTER_PLATFORM_DIRS", "1")
    yield env
    mp.undo()


def _random_default_shape_model(path: Path) -> Path:
    import torch

    from workbench.models.config import LlamaConfig
    from workbench.models.llama import Llama
    from workbench.runtime.checkpoint import save_llama
    from workbench.runtime.tokenizer import ByteTokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=259, d_model=128, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=344,
                      max_seq_len=1024, bos_id=256, eos_id=257)
    save_llama(Llama(cfg), path, ByteTokenizer(bos_id=256, eos_id=257))
    return path


def test_the_five_example_notebooks_exist():
    assert NAMES == ["01-quickstart.ipynb", "02-tensor-parallel.ipynb", "03-redistribution.ipynb",
                     "04-perceiver-ar.ipynb", "05-plain-xarray.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip outputs before committing"


def test_notebooks_match_their_source():
    """notebooks/build.py is the source of the notebooks: rebuilding changes nothing."""
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import build
    finally:
        sys.path.remove(str(NOTEBOOKS))
    for name, cells in build.NOTEBOOKS.items():
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        assert [c.source for c in nb.cells] == [c.source for c in cells], f"{name}: run notebooks/build.py"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, kernel_env, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    t0 = time.perf_counter()
    client.execute()   # raises CellExecutionError naming the cell and its traceback on any error
    seconds = time.perf_counter() - t0
    print(f"{name}: {seconds:.1f} s")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    texts = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Traceback" not in texts
    widget_views = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    if name != "05-plain-xarray.ipynb":   # every other notebook shows trace widgets
        assert widget_views, f"{name}: no widget was displayed"
    # Nothing was written into the repository.
    assert not list(NOTEBOOKS.glob("*.zarr")) and not (NOTEBOOKS / "runs").exists()
