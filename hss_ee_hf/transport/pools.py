"""Replica pools: each party is one or more share servers holding the same checkpoint (DESIGN.md §9).

`endpoints` names the two parties. Each party is a single address (`"a:50051"`), a comma-separated pool
(`"a1:50051,a2:50051"`, the CLI form) or a sequence of addresses (`("a1:50051", "a2:50051")`). [`parse_endpoints`]
turns any of these into two pools and refuses, before any request is sent, an address found in both pools: a
server that received both shares would see the private input. [`grpc_target`] then writes the pool as the target
of one gRPC channel, which spreads calls over the pool's healthy replicas (`round_robin`, see
[`hss_ee_hf.transport.service_config`]).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import InvalidConfigError

PARTY_NAMES = ("A", "B")
# Addresses gRPC resolves itself (DNS names, `dns:///`, `unix:` ...) pass through unchanged when alone in a pool.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


class EndpointError(InvalidConfigError):
    """The `endpoints` given for the two parties are malformed."""


class SharedAddressError(EndpointError):
    """One address is in both parties' pools: that server would receive both shares and learn the input.

    Attributes:
        address (`str`): the address found in both pools.
    """

    def __init__(self, address: str, message: str):
        super().__init__(message)
        self.address = address


@dataclass(frozen=True)
class Replica:
    """One `host:port` of a pool; `host` without IPv6 brackets, lower case."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        """Whether `host` is an IP literal (not a DNS name)."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_replica(address: str, party: str) -> Replica:
    """Parses `host:port` (`[v6]:port` for IPv6).

    Raises:
        `EndpointError`: the address has no port, a bad port or no host.
    """
    text = address.strip()
    host, sep, port = text.rpartition(":")
    if text.startswith("[") and "]" in text:
        host, sep, port = text[1 : text.index("]")], ":", text[text.index("]") + 2 :]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or (":" in host and "[" not in text):
        raise EndpointError(
            f"party {party}: {address!r} is not a 'host:port' address (IPv6 as '[::1]:50051'); a pool is written "
            "'host1:port,host2:port'"
        )
    try:  # one spelling per IP address, so `[::1]` and `[0:0:0:0:0:0:0:1]` compare equal
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = host.lower()
    return Replica(host, int(port))


def _split(party_spec: str | Sequence[str], party: str) -> tuple[str, ...]:
    if isinstance(party_spec, str):
        items = [party_spec]
    elif isinstance(party_spec, Sequence) and all(isinstance(item, str) for item in party_spec):
        items = list(party_spec)
    else:
        raise EndpointError(f"party {party}: expected 'host:port' strings, got {party_spec!r}")
    addresses = tuple(a.strip() for item in items for a in item.split(",") if a.strip())
    if not addresses:
        raise EndpointError(f"party {party}: no address given; pass 'host:port' or a pool 'host1:port,host2:port'")
    return addresses


@dataclass(frozen=True)
class PartyPools:
    """The two parties' pools, as given (`addresses`) and parsed (`replicas`).

    A party given as one gRPC target that is not `host:port` (`dns:///name:port`, `unix:path`) has `replicas`
    `None`: gRPC resolves it, and it is compared with the other party's addresses literally.
    """

    addresses: tuple[tuple[str, ...], tuple[str, ...]]
    replicas: tuple[tuple[Replica, ...] | None, tuple[Replica, ...] | None]

    @property
    def names(self) -> tuple[str, str]:
        """One name per party for messages: its addresses joined with commas."""
        return (",".join(self.addresses[0]), ",".join(self.addresses[1]))

    def is_pool(self, party: int) -> bool:
        """Whether `party` has more than one replica."""
        return len(self.addresses[party]) > 1


def parse_endpoints(endpoints: Sequence[str | Sequence[str]]) -> PartyPools:
    """Parses `endpoints` into one pool per party and checks that no address serves both parties.

    Args:
        endpoints (`Sequence`): two items, party A then party B; each a `"host:port"`, a comma-separated pool
            `"h1:port,h2:port"`, or a sequence of `"host:port"`.

    Returns:
        `PartyPools`: the two pools.

    Raises:
        `EndpointError`: not two parties, an empty pool, a malformed address, or an address twice in one pool.
        `SharedAddressError`: an address is in both pools (named in the message).

    Example:

    ```python
    >>> parse_endpoints((("10.0.0.1:50051", "10.0.0.2:50051"), "10.1.0.1:50051,10.1.0.2:50051")).names
    ('10.0.0.1:50051,10.0.0.2:50051', '10.1.0.1:50051,10.1.0.2:50051')
    >>> parse_endpoints(("10.0.0.1:50051", "10.0.0.1:50051"))
    SharedAddressError: 10.0.0.1:50051 is in the pools of both party A and party B ...
    ```
    """
    if isinstance(endpoints, str) or not isinstance(endpoints, Sequence) or len(endpoints) != 2:
        raise EndpointError(
            f"endpoints must name two parties (A, B), each 'host:port' or a pool of them, got {endpoints!r}; "
            "e.g. ('a:50051', 'b:50051') or (('a1:50051', 'a2:50051'), ('b1:50051', 'b2:50051'))"
        )
    addresses = tuple(_split(spec, name) for spec, name in zip(endpoints, PARTY_NAMES, strict=True))
    replicas = []
    for pool, name in zip(addresses, PARTY_NAMES, strict=True):
        if len(pool) == 1 and pool[0].startswith(_SCHEMES):
            replicas.append(None)
            continue
        parsed = tuple(parse_replica(a, name) for a in pool)
        if len(set(parsed)) != len(parsed):
            twice = next(str(r) for r in parsed if parsed.count(r) > 1)
            raise EndpointError(f"party {name}: {twice} is listed twice in its pool; list each replica once")
        replicas.append(parsed)
    pools = PartyPools(addresses, (replicas[0], replicas[1]))
    _refuse_shared(pools)
    return pools


def _keys(pools: PartyPools, party: int) -> dict[str, str]:
    """Comparable form of each address of `party` -> the address as given."""
    if pools.replicas[party] is None:
        return {pools.addresses[party][0].lower(): pools.addresses[party][0]}
    return {str(r): a for r, a in zip(pools.replicas[party], pools.addresses[party], strict=True)}


def _refuse_shared(pools: PartyPools) -> None:
    a, b = _keys(pools, 0), _keys(pools, 1)
    shared = sorted(set(a) & set(b))
    if shared:
        raise SharedAddressError(
            a[shared[0]],
            f"{a[shared[0]]} is in the pools of both party A and party B: that server would receive both shares "
            "of every input and could reconstruct it. Give each party only servers run by its own operator",
        )


Resolver = Callable[[str, int], list[str]]


def _resolve(host: str, port: int) -> list[str]:
    """The IP addresses of `host` (IPv4 first), as `getaddrinfo` reports them."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos}, key=lambda ip: (":" in ip, ip))


def grpc_target(pools: PartyPools, party: int, resolve: Resolver = _resolve) -> str:
    """The gRPC channel target of one party.

    A single address is returned as given (gRPC resolves it). A pool becomes an `ipv4:` or `ipv6:` target listing
    every replica; DNS names in it are resolved here, once, at connect, and a resolved address also found in the
    other party's pool is refused.

    Raises:
        `EndpointError`: a name does not resolve, or the pool mixes IPv4 and IPv6 replicas.
        `SharedAddressError`: a replica resolves to an address of the other party.
    """
    name = PARTY_NAMES[party]
    if not pools.is_pool(party):
        return pools.addresses[party][0]
    ips = [_replica_ips(r, name, resolve)[0] for r in pools.replicas[party]]
    other = pools.replicas[1 - party]
    if other is not None:
        theirs = {f"{ip}:{r.port}" for r in other for ip in _replica_ips(r, PARTY_NAMES[1 - party], resolve)}
        for replica, ip in zip(pools.replicas[party], ips, strict=True):
            if f"{ip}:{replica.port}" in theirs:
                raise SharedAddressError(
                    str(replica),
                    f"{replica} (party {name}) resolves to {ip}:{replica.port}, which is also in party "
                    f"{PARTY_NAMES[1 - party]}'s pool: that server would receive both shares. Give each party only "
                    "servers run by its own operator",
                )
    v6 = [":" in ip for ip in ips]
    if any(v6) and not all(v6):
        raise EndpointError(
            f"party {name}: the pool mixes IPv4 and IPv6 replicas ({pools.names[party]}); use one family"
        )
    if all(v6):
        return "ipv6:" + ",".join(f"[{ip}]:{r.port}" for ip, r in zip(ips, pools.replicas[party], strict=True))
    return "ipv4:" + ",".join(f"{ip}:{r.port}" for ip, r in zip(ips, pools.replicas[party], strict=True))


def _replica_ips(replica: Replica, party: str, resolve: Resolver) -> list[str]:
    if replica.is_ip:
        return [replica.host]
    try:
        ips = resolve(replica.host, replica.port)
    except OSError as err:
        raise EndpointError(f"party {party}: cannot resolve {replica} ({err}); check the host name") from err
    if not ips:
        raise EndpointError(f"party {party}: {replica} resolves to no address; check the host name")
    return ips


def tls_target_name(pools: PartyPools, party: int, server_name: str | None) -> str | None:
    """The name a party's servers must carry in their certificates, or `None` to check the host as usual.

    `server_name` is one name for both parties, or `"NAME_A,NAME_B"`: two operators issue their certificates
    from their own CAs, usually for names of their own. Without it, a pool uses the host shared by every replica
    (same name, several ports): a pool's target has no host name of its own.

    Raises:
        `EndpointError`: `server_name` has more than two names, or a pool of different host names has no name.
    """
    names = [n.strip() for n in server_name.split(",")] if server_name else []
    if len(names) > 2 or not all(names):
        raise EndpointError(
            f"tls_server_name {server_name!r} must be one name, or two separated by a comma (party A's, party B's)"
        )
    if names:
        return names[party] if len(names) == 2 else names[0]
    if not pools.is_pool(party):
        return None
    hosts = {r.host for r in pools.replicas[party]}
    if len(hosts) == 1:
        return hosts.pop()
    raise EndpointError(
        f"party {PARTY_NAMES[party]}: the TLS replicas {pools.names[party]} have different host names, and one "
        "channel checks one name; give every replica of the party a certificate with a common name in its SAN and "
        "pass it as `--tls-server-name NAME_A,NAME_B` (`HSSEEClientConfig(tls_server_name=...)`)"
    )
