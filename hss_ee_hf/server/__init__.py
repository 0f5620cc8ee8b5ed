"""The share server (DESIGN.md §2, §7): what `hss-ee serve` runs on each untrusted host.

* `engine`: [`StageEngine`], the compute core: stage weights in the kernel's form, validated ring products.
* `batching`: concurrent requests for one stage computed in one product.
* `servicer`: the gRPC service; `grpc_server`: binding, limits, graceful shutdown ([`serve`], [`start_server`]).
* `security`: what the server demands of clients (TLS, mutual TLS, tokens).
* `socket_server`: the data plane, the same stage calls as binary frames on a second port; `handle`: both planes
  stopped together.

Nothing here imports the client model, the pipelines or the EE transforms.
"""

from .engine import StageEngine
from .grpc_server import serve, start_server

__all__ = ["StageEngine", "serve", "start_server"]
