"""A local ``tritonserver`` on 127.0.0.1 serving a repository's CPU model (tests, ``make serve``).

The binary comes from the ``nvidia-pytriton`` wheel, located without importing the package (see
:func:`find_tritonserver`), or from PATH. The repository itself is written by ``triton.py``.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from edgeseg.runtime.errors import BackendUnavailableError

log = logging.getLogger(__name__)

CPU_MODEL = "edgeseg"  # the model the CPU server loads (the Python-backend model of triton.py's repository)

PYTRITON_INSTALL = "pip install --no-deps 'nvidia-pytriton==0.7.0'"  # what `make setup` runs (x86_64/aarch64 Linux)


def find_tritonserver() -> Path:
    """The ``tritonserver`` binary the ``nvidia-pytriton`` wheel ships, or one on PATH.

    The wheel is located with ``importlib.util.find_spec`` and never imported: ``make setup``
    installs it with ``--no-deps`` (its numpy<2 pin would break OpenCV 5), so importing
    ``pytriton`` fails on its missing pure-Python dependencies (typing_inspect, wrapt, ...),
    while the server binary inside it needs none of them.
    """
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            binary = Path(folder) / "tritonserver" / "bin" / "tritonserver"
            if binary.is_file():
                return binary
        raise BackendUnavailableError(f"nvidia-pytriton is installed ({list(spec.submodule_search_locations)[0]}) but "
                                      "has no tritonserver/bin/tritonserver; reinstall it: "
                                      f"{PYTRITON_INSTALL} --force-reinstall")
    found = shutil.which("tritonserver")
    if found:
        return Path(found)
    raise BackendUnavailableError(f"no tritonserver found: {PYTRITON_INSTALL} (what `make setup` installs; --no-deps "
                                  "because the wheel's numpy<2 pin conflicts with OpenCV 5 and the server binary does "
                                  "not need it), or run NVIDIA's Triton container")


def python_backend_dir(work: Path) -> Path:
    """A backend folder whose Python backend uses the stub for this interpreter's version.

    The wheel keeps stubs per Python version apart from the backend; Triton looks for
    ``backends/python/triton_python_backend_stub``. Links in ``work`` assemble that layout
    without touching site-packages.
    """
    root = find_tritonserver().parent.parent
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise BackendUnavailableError(f"{root}: no Python backend stub for Python {version}")
    py = work / "backends" / "python"
    py.mkdir(parents=True, exist_ok=True)
    for src in [*(root / "backends" / "python").iterdir(), stub]:
        link = py / src.name
        if not link.exists():
            link.symlink_to(src)
    return work / "backends"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """A ``tritonserver`` on 127.0.0.1 with free ports, reaped on exit (a context manager)."""

    def __init__(self, repository: str | Path, work: str | Path, log_file: str | Path | None = None):
        self.repository, self.work = Path(repository), Path(work)
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_file = Path(log_file) if log_file else self.work / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout_s: float = 120.0) -> "TritonServer":
        self.work.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # the stub embeds Python: it must load this interpreter's libpython and see its packages
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [sysconfig.get_config_var("LIBDIR"),
                                                               env.get("LD_LIBRARY_PATH")]))
        import site

        env["EDGESEG_SITE_DIRS"] = os.pathsep.join(site.getsitepackages())
        cmd = [str(find_tritonserver()), f"--model-repository={self.repository}",
               f"--backend-directory={python_backend_dir(self.work)}",
               "--http-address=127.0.0.1", f"--http-port={self.http_port}",
               "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
               "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
               f"--load-model={CPU_MODEL}", "--model-control-mode=explicit", "--log-verbose=0"]
        self._log = open(self.log_file, "w")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        import urllib.request

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}; see {self.log_file}:\n"
                                   + self.log_file.read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{CPU_MODEL}/ready", timeout=1) as r:
                    if r.status == 200:
                        log.info("tritonserver ready: HTTP %s, gRPC %s", self.http_url, self.grpc_url)
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f} s; see {self.log_file}")

    def metrics(self) -> dict[str, float]:
        """Triton's Prometheus counters of the served model (inference and execution counts)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith(("nv_inference_count", "nv_inference_exec_count", "nv_inference_request_success",
                                "nv_inference_request_failure")) and f'model="{CPU_MODEL}"' in line:
                out[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
        return out

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
