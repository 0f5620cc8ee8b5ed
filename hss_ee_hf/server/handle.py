"""A running share server: its gRPC server and its data plane, stopped together."""

from __future__ import annotations

import threading
from typing import Any

import grpc

from .socket_server import DataPlaneServer


class ShareServerHandle:
    """A running share server: its gRPC server and its data plane, stopped together.

    Everything else (`wait_for_termination`, ...) is the `grpc.Server`'s.

    Attributes:
        data_port (`int`): the data plane's port, 0 when it has none.
    """

    def __init__(self, grpc_server: grpc.Server, data_plane: DataPlaneServer | None):
        self.grpc_server, self.data_plane = grpc_server, data_plane
        self.data_port = data_plane.port if data_plane is not None else 0

    def stop(self, grace: float | None) -> threading.Event:
        """Stops both planes; requests in flight get `grace` seconds. Returns an event set once both have stopped."""
        stopped = [self.grpc_server.stop(grace)]
        if self.data_plane is None:
            return stopped[0]
        stopped.append(self.data_plane.stop(grace))
        done = threading.Event()

        def wait_both() -> None:
            for event in stopped:
                event.wait()
            done.set()

        threading.Thread(target=wait_both, name="hss-ee-stop", daemon=True).start()
        return done

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grpc_server, name)
