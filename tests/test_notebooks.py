"""The teaching notebooks in notebooks/: each runs top to bottom on the toy models, offline, and
the committed files carry no outputs."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# Run first in the kernel, not part of the notebook: any connection that leaves the machine
# raises (the kernel's own ZeroMQ sockets are libzmq's and local; loopback stays allowed).
NO_NETWORK = r'''
import socket as _socket

_LOCAL = ("127.", "::1", "localhost", "0.0.0.0")


def _is_local(address):
    host = address[0] if isinstance(address, tuple) else address
    return not isinstance(host, str) or host.startswith(_LOCAL + ("/", "\0"))


class _NoNetwork(OSError):
    pass


_connect = _socket.socket.connect
_connect_ex = _socket.socket.connect_ex


def _guard_connect(self, address):
    if not _is_local(address):
        raise _NoNetwork(f"notebook tried to reach the network: {address!r}")
    return _connect(self, address)


def _guard_connect_ex(self, address):
    if not _is_local(address):
        raise _NoNetwork(f"notebook tried to reach the network: {address!r}")
    return _connect_ex(self, address)


_socket.socket.connect = _guard_connect
_socket.socket.connect_ex = _guard_connect_ex
del _guard_connect, _guard_connect_ex
'''


def _kernel_manager(tmp_path: Path):
    """A kernel manager for THIS interpreter's ipykernel (not whatever 'python3' resolves to)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = tmp_path / "kernels" / "corelens-test"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "corelens tests", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="corelens-test", kernel_spec_manager=ksm)


def execute(path: Path, tmp_path: Path, timeout: int = 300):
    """Run a notebook top to bottom in a fresh kernel; returns (executed notebook, seconds).
    A cell error raises ``nbclient.exceptions.CellExecutionError``."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    guard = nbformat.v4.new_code_cell(NO_NETWORK)
    guard.id = "corelens-test-no-network"
    nb.cells.insert(0, guard)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYDEVD_DISABLE_FILE_VALIDATION="1")
    # the notebook imports the corelens of this checkout, not whichever one is installed
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("MPLBACKEND", None)  # ipykernel then picks its inline backend: figures render
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=timeout,
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute(env=env)
    return nb, time.perf_counter() - start


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    for expected in ("01_quickstart.ipynb", "02_core_heads.ipynb", "03_causal.ipynb",
                     "04_acceleration.ipynb", "05_circuits.ipynb", "06_video.ipynb",
                     "07_saes.ipynb"):
        assert expected in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebooks_have_no_outputs(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs: clear them"
        assert cell.get("execution_count") is None, f"{path.name} cell {i} has a count"
    # no kernel / editor state beyond what the notebook needs
    assert set(nb["metadata"]) <= {"kernelspec", "language_info"}, nb["metadata"].keys()


_REMOTE = re.compile(r"""<(script|link|img|iframe)[^>]+(src|href)\s*=\s*["']?(https?:)?//""",
                     re.I)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_offline(path, tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb, seconds = execute(path, tmp_path)
    print(f"{path.name}: {seconds:.1f} s")
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
            data = out.get("data", {})
            html = data.get("text/html", "")
            html = "".join(html) if isinstance(html, list) else html
            # views are self-contained: nothing loaded from a CDN or any other host
            assert not _REMOTE.search(html), _REMOTE.search(html).group(0)
            # a figure that only printed its repr did not render (no inline backend)
            text = data.get("text/plain", "")
            text = "".join(text) if isinstance(text, list) else text
            assert "image/png" in data or not text.startswith("<Figure"), text
