"""Execute notebooks/*.ipynb offline and keep the executed copies in build/notebooks/.

    python docs/run_notebooks.py            # execute the notebooks whose copy is missing or stale
    python docs/run_notebooks.py --force    # execute them all again

The notebooks are executed ONCE and the copies serve twice: ``tests/test_notebooks.py`` (which
checks that each runs top to bottom) writes them here, and the documentation site renders them
(``docs/hooks.py`` hands them to mkdocs-jupyter, which only converts them: ``execute: false``).
A copy is reused only while it is current: it records a fingerprint of the committed notebook,
of every file of ``src/corelens``, of the libraries the notebooks run on and of this script, and
one whose fingerprint differs is executed again. The tests also want a copy made in their own
session (``run``: ``CORELENS_TEST_RUN``, set by tests/conftest.py), so a copy left by an earlier
session is executed again there; the docs build takes any current copy, and tags the copies it
makes with the session it runs in, if any. Each notebook has a lock file, so that two processes
(the two pytest-xdist workers, or a docs build beside the tests) never execute the same notebook
at once: the second one waits and reuses the first one's copy.

Every notebook runs in a fresh kernel of THIS interpreter, with the checkout's ``src`` first on
``PYTHONPATH`` and a guard cell run first (``NO_NETWORK``) that makes any connection leaving the
machine raise. A copy is only written for a notebook that ran without an error and passed
``problems`` (no view loading anything from another host, every figure rendered as a PNG); the
guard cell and the stderr streams are left out of it. The committed notebooks stay output-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
OUT = ROOT / "build" / "notebooks"
GUARD_ID = "corelens-test-no-network"
# the libraries whose version can change a notebook's outputs (with corelens's own files)
LIBRARIES = ("torch", "torchvision", "transformers", "transformer-lens", "circuitsvis",
             "matplotlib", "pillow", "numpy", "ipykernel", "nbclient")

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

# an HTML output that loads something from another host (a CDN script, a remote image ...)
REMOTE = re.compile(r"""<(script|link|img|iframe)[^>]+(src|href)\s*=\s*["']?(https?:)?//""",
                    re.I)


def _kernel_manager(workdir: Path):
    """A kernel manager for THIS interpreter's ipykernel (not whatever 'python3' resolves to)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = workdir / "kernels" / "corelens-test"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "corelens tests", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(workdir / "kernels")])
    return KernelManager(kernel_name="corelens-test", kernel_spec_manager=ksm)


def execute(path: Path, workdir: Path, timeout: int = 300):
    """Run a notebook top to bottom in a fresh kernel (cwd ``workdir``); returns (executed
    notebook, seconds), the guard cell still first. A cell error raises
    ``nbclient.exceptions.CellExecutionError``."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    guard = nbformat.v4.new_code_cell(NO_NETWORK)
    guard.id = GUARD_ID
    nb.cells.insert(0, guard)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYDEVD_DISABLE_FILE_VALIDATION="1")
    # the notebook imports the corelens of this checkout, not whichever one is installed
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("MPLBACKEND", None)  # ipykernel then picks its inline backend: figures render
    client = NotebookClient(nb, km=_kernel_manager(workdir), timeout=timeout,
                            resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    client.execute(env=env)
    return nb, time.perf_counter() - start


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else (value or "")


def problems(nb) -> list[str]:
    """What is wrong with an executed notebook's outputs: errors, HTML that loads anything from
    another host, figures that printed their repr instead of rendering."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"cell {i}: {out.get('ename')}: {out.get('evalue')}")
            data = out.get("data", {})
            remote = REMOTE.search(_text(data.get("text/html")))
            if remote:  # views are self-contained: nothing loaded from a CDN or any other host
                found.append(f"cell {i}: loads from another host: {remote.group(0)}")
            text = _text(data.get("text/plain"))
            if text.startswith("<Figure") and "image/png" not in data:
                found.append(f"cell {i}: a figure did not render (no inline backend): {text}")
    return found


def _for_readers(nb) -> None:
    """The copy as a reader of the notebook sees it: the guard cell gone (execution counts from
    1 again) and the stderr streams dropped (progress bars, library warnings that name this
    machine's paths); errors are not streams, and ``problems`` has seen everything first."""
    nb.cells = [c for c in nb.cells if c.get("id") != GUARD_ID]
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.get("execution_count"):
            cell.execution_count -= 1
        cell.outputs = [o for o in cell.get("outputs", [])
                        if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
        for out in cell.outputs:
            if out.get("execution_count"):
                out["execution_count"] -= 1


def fingerprint(path: Path) -> str:
    """The notebook, every file of the corelens package, the libraries' versions and this
    script (how a copy is made)."""
    h = hashlib.sha256(path.read_bytes())
    h.update(Path(__file__).read_bytes())
    src = ROOT / "src" / "corelens"
    for f in sorted(src.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(src)).encode() + b"\0" + f.read_bytes())
    for name in LIBRARIES:
        try:
            h.update(f"{name}=={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{name} absent".encode())
    return h.hexdigest()


def copy_path(path: Path) -> Path:
    return OUT / path.name


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the notebook's lock; yields False at once (not held) if another process has it and
    ``wait`` is False."""
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"{path.stem}.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _current(copy: Path, fp: str, run: str | None):
    """The executed copy if it is current (and made in session ``run``, when one is given)."""
    import nbformat

    if not copy.exists():
        return None
    try:
        nb = nbformat.read(copy, as_version=4)
    except Exception:  # a torn or foreign file: execute again
        return None
    meta = nb.metadata.get("corelens", {})
    if meta.get("fingerprint") != fp or (run is not None and meta.get("run") != run):
        return None
    return nb


def ensure_executed(path: Path, run: str | None = None, require_run: bool = False,
                    force: bool = False):
    """The executed copy of notebook ``path`` (an ``nbformat`` notebook): reused when current
    (and, with ``require_run``, made in session ``run``), else executed now and written to
    ``build/notebooks/``, tagged with ``run``. Raises on a cell error (nbclient's
    ``CellExecutionError``) or on ``problems``; then nothing is written."""
    return execute_if_stale(Path(path), run, require_run, force)[0]


def execute_if_stale(path: Path, run: str | None = None, require_run: bool = False,
                     force: bool = False, wait: bool = True):
    """(executed notebook, whether it was executed now); ``(None, False)`` without ``wait``
    while another process executes the same notebook."""
    import nbformat

    copy = copy_path(path)
    with _locked(path, wait) as held:
        if not held:
            return None, False
        fp = fingerprint(path)
        nb = None if force else _current(copy, fp, run if require_run else None)
        if nb is not None:
            return nb, False
        with tempfile.TemporaryDirectory(prefix="corelens-nb-") as tmp:
            nb, seconds = execute(path, Path(tmp))
        found = problems(nb)
        if found:
            raise AssertionError(f"{path.name}: " + "; ".join(found))
        _for_readers(nb)
        nb.metadata["corelens"] = {"fingerprint": fp, "run": run or "",
                                   "seconds": round(seconds, 1)}
        tmp_copy = copy.with_suffix(".ipynb.tmp")
        nbformat.write(nb, tmp_copy)
        os.replace(tmp_copy, copy)
        return nb, True


def main(argv: list[str]) -> int:
    force = "--force" in argv
    for path in NOTEBOOKS:
        nb, executed = execute_if_stale(path, force=force)
        took = nb.metadata["corelens"].get("seconds")
        print(f"{path.name}: {f'executed in {took} s' if executed else 'current, reused'} "
              f"-> {copy_path(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
