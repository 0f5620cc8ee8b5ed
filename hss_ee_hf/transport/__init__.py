"""How shares travel between the client and the two servers (DESIGN.md §7).

* `base`: the [`Transport`] interface, the wire [`PROTOCOL_VERSION`] and the [`StageHandler`] interface a server
  core implements.
* `inprocess`: [`InProcessTransport`], two stage handlers in this process (tests, single-machine trials).
* `grpc_client`: `GrpcTransport`, the client of two `hss-ee serve` processes; `streams`: its long-lived streams.
* `config`: [`HSSEEClientConfig`] (TLS, tokens, deadlines, retries) and the helpers both sides share.
* `protos`: the generated gRPC wire format.
* `frames`: the data plane's binary wire format; `socket_client`: `DataPlaneTransport`, stage calls as frames on
  each single-address server's data port (gRPC stays the control plane and fallback); `socket_connection`: one
  data-plane connection.

Nothing here imports the server or the client model.
"""

from .base import PROTOCOL_VERSION, StageHandler, Transport, bytes_to_share
from .inprocess import InProcessTransport

__all__ = ["PROTOCOL_VERSION", "InProcessTransport", "StageHandler", "Transport", "bytes_to_share"]
