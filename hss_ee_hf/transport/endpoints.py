"""Share-server addresses: parsing `host:port`, and proving the two parties are two different servers.

The whole privacy argument rests on party A and party B being different processes run by parties that do not
collude (DESIGN.md §2): one process that receives both the seed of share A and share B reconstructs the user's
activations. So before any share leaves the client, [`check_distinct_parties`] refuses two parties that

* resolve to the same address (`127.0.0.1:50051` and `localhost:50051` are one socket),
* list the same address in both pools (a replica may serve one party only), or
* report the same server instance id in `Describe` (one process reached under two names, e.g. a server on
  `0.0.0.0` dialled as `127.0.0.1` and as `127.0.0.2`).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Sequence

from ..errors import InvalidConfigError, PartyOverlapError

# gRPC target schemes (`dns:///h:p`, `unix:/path`, `ipv4:1.2.3.4:5`...) are passed through unparsed.
_SCHEME = re.compile(r"^(dns|unix|unix-abstract|ipv4|ipv6|vsock|xds|google-c2p):")
_WHY = (
    "one process would receive both the seed of party A's share and party B's share, and so reconstruct every "
    "activation of the user: the two parties must be two servers run by parties that do not collude"
)


def parse_endpoint(endpoint: object, what: str = "endpoint") -> tuple[str, int]:
    """Splits `host:port` (IPv6 as `[::1]:port`) and checks the port is 1-65535.

    Args:
        endpoint (`str`): the address, e.g. `"10.0.0.1:50051"` or `"[::1]:50051"`.
        what (`str`, *optional*): how the caller names it in messages (e.g. `"--endpoints A"`).

    Returns:
        `(host, port)`; for a gRPC target with a scheme (`dns:///h:p`, `unix:/path`) `(endpoint, 0)`.

    Raises:
        `InvalidConfigError`: not a string, no port (gRPC would silently dial port 443), or a port out of range.
    """
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise InvalidConfigError(f"{what} must be a 'host:port' string, got {endpoint!r}")
    if _SCHEME.match(endpoint):
        return endpoint, 0
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not host or (":" in host and not (host.startswith("[") and host.endswith("]"))):
        raise InvalidConfigError(
            f"{what} {endpoint!r} has no port; write 'host:port' (e.g. '{endpoint.strip('[]')}:50051', IPv6 as "
            "'[::1]:50051'). Without a port gRPC would dial port 443"
        )
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidConfigError(f"{what} {endpoint!r}: the port must be an integer in 1-65535, got {port_text!r}")
    return host.strip("[]"), int(port_text)


def check_endpoint_pair(endpoints: object) -> tuple[str, str]:
    """Checks `endpoints` is two valid `host:port` strings (party A, party B) and returns them as a tuple.

    Raises:
        `InvalidConfigError`: a single string (`"ab"` is not two hosts `a` and `b`), not two items, or a bad item.
    """
    if isinstance(endpoints, (str, bytes)) or not isinstance(endpoints, Sequence) or len(endpoints) != 2:
        raise InvalidConfigError(
            f'endpoints must be two "host:port" strings, (party A, party B), got {endpoints!r}; pass '
            'endpoints=("hostA:50051", "hostB:50051")'
        )
    for party, endpoint in zip("AB", endpoints, strict=True):
        parse_endpoint(endpoint, f"the endpoint of party {party}")
    return endpoints[0], endpoints[1]


def _resolved(endpoint: str) -> set[tuple[str, int]]:
    """Every (ip, port) `endpoint` resolves to; the literal itself when it cannot be resolved."""
    host, port = parse_endpoint(endpoint)
    if port == 0:
        return {(endpoint, 0)}
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):  # unresolvable: the connection will fail and say so
        return {(host.lower(), port)}
    return {(info[4][0], port) for info in infos}


def check_distinct_addresses(pools: Sequence[Iterable[str]]) -> None:
    """Refuses an address that appears, after DNS resolution, in both parties' pools.

    Args:
        pools (`Sequence[Iterable[str]]`): the addresses of party A's replicas, then party B's.

    Raises:
        `PartyOverlapError`: naming both spellings of the shared address and why it matters.
    """
    seen: dict[tuple[str, int], tuple[int, str]] = {}
    for party, pool in enumerate(pools):
        for endpoint in pool:
            for address in _resolved(endpoint):
                other = seen.get(address)
                if other is not None and other[0] != party:
                    raise PartyOverlapError(
                        f"party A's {seen[address][1]!r} and party B's {endpoint!r} are the same address "
                        f"{address[0]}:{address[1]}; {_WHY}. Point the client at two different servers"
                    )
                seen.setdefault(address, (party, endpoint))


def check_distinct_parties(infos: Sequence[dict]) -> None:
    """Refuses two parties whose `Describe` answers report the same server instance id.

    Args:
        infos (`Sequence[dict]`): `describe()` answers of party A and party B (keys `endpoint`, `instance_id`,
            `operator`); an empty instance id (a server from before ids) is not compared.

    Raises:
        `PartyOverlapError`: both answers come from one server process.
    """
    a, b = infos
    if a.get("instance_id") and a.get("instance_id") == b.get("instance_id"):
        raise PartyOverlapError(
            f"{a['endpoint']} and {b['endpoint']} are the same server process (instance id "
            f"{a['instance_id'][:12]}…); {_WHY}. Start a second `hss-ee serve` run by the other party"
        )
    if a.get("operator") and a.get("operator") == b.get("operator"):
        raise PartyOverlapError(
            f"{a['endpoint']} and {b['endpoint']} are both run by operator {a['operator']!r}; {_WHY}. Use servers "
            "of two different operators"
        )
