"""Real `hss-ee serve` processes for tests: start one on a chosen port, wait until it answers, stop it."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hss_ee_hf.cli.demo import free_port
from hss_ee_hf.errors import TransportError
from hss_ee_hf.transport.config import HSSEEClientConfig
from hss_ee_hf.transport.grpc_client import GrpcTransport


class ServerProcess:
    """One `hss-ee serve CHECKPOINT --port PORT ...` subprocess with its stderr kept in a file."""

    def __init__(self, checkpoint: Path, port: int | None = None, args: list[str] | tuple[str, ...] = ()):
        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "hss_ee_hf.cli", "serve", str(checkpoint), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        """Blocks until the server answers `Describe`; raises with its log if it exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise TransportError(self.endpoint, f"server exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                config = HSSEEClientConfig(timeout=2.0, retries=0)
                with GrpcTransport((self.endpoint, "127.0.0.1:9"), config=config) as probe:
                    probe._call_party(0, "Describe", probe_request(), _never())
                return self
            except TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def wait_exit(self, timeout: float = 180.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def probe_request():
    from hss_ee_hf.transport.protos import hss_ee_pb2

    return hss_ee_pb2.DescribeRequest()


def _never():
    import threading

    return threading.Event()


@contextlib.contextmanager
def servers(checkpoint: Path, count: int = 2, args: list[str] | tuple[str, ...] = ()):
    """`count` ready servers of `checkpoint`; stopped on exit."""
    procs = [ServerProcess(checkpoint, args=args) for _ in range(count)]
    try:
        for proc in procs:
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs:
            proc.stop()
