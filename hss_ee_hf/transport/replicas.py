"""Asks every replica of a pool what it serves, each through its own short-lived channel.

A pool's channel sends each call to whichever replica `round_robin` picks, so a `Describe` on it checks only
one of them. At connect, [`describe_replicas`] asks each replica directly, so a replica serving another
checkpoint or protocol version is named before any stage call. A replica that is down at connect is skipped
with a warning (the pool exists to ride out such outages): the servers also check the fingerprint of every
stage request, so one that comes up later with another checkpoint refuses calls instead of answering wrongly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from ..errors import TransportError
from .base import scales_from_bytes
from .pools import PARTY_NAMES, PartyPools
from .protos import hss_ee_pb2, hss_ee_pb2_grpc

logger = logging.getLogger(__name__)


def describe_dict(reply: hss_ee_pb2.DescribeReply, endpoint: str) -> dict:
    """One server's `Describe` reply as the dict [`GrpcTransport.describe`] returns."""
    return {
        "endpoint": endpoint,
        "fingerprint": reply.fingerprint,
        "protocol_version": reply.protocol_version,
        "max_rows": reply.max_rows,
        "instance_id": reply.instance_id,
        "operator": reply.operator,
        "stages": {s.name: (s.in_features, s.out_features) for s in reply.stages},
        "schedules": tuple(reply.schedules) or (4,),
        "scales": {s.name: scales_from_bytes(s.scales, s.out_features, endpoint) for s in reply.stages if s.scales},
        "data_port": reply.data_port,
    }


def _describe_one(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    options: Sequence[tuple[str, Any]],
    metadata: tuple,
    timeout: float,
) -> hss_ee_pb2.DescribeReply | grpc.RpcError:
    # No service config on this channel: one address, one attempt, and a down replica answers at once.
    plain = [(k, v) for k, v in options if k not in ("grpc.service_config", "grpc.enable_retries")]
    plain.append(("grpc.enable_retries", 0))
    if credentials is None:
        channel = grpc.insecure_channel(address, options=plain)
    else:
        channel = grpc.secure_channel(address, credentials, options=plain)
    try:
        stub = hss_ee_pb2_grpc.ShareServerStub(channel)
        return stub.Describe(hss_ee_pb2.DescribeRequest(), timeout=timeout, metadata=metadata)
    except grpc.RpcError as err:
        return err
    finally:
        channel.close()


def describe_replicas(
    pools: PartyPools,
    party: int,
    credentials: grpc.ChannelCredentials | None,
    options: Sequence[tuple[str, Any]],
    metadata: tuple,
    timeout: float,
) -> list[tuple[str, hss_ee_pb2.DescribeReply]]:
    """`Describe` of every replica of one party's pool, asked in parallel.

    Args:
        pools (`PartyPools`): the parsed endpoints.
        party (`int`): 0 for party A, 1 for party B.
        credentials (`grpc.ChannelCredentials`, *optional*): TLS credentials of the party's channel.
        options (`Sequence`): the party's channel options (TLS name, message limits); its service config is
            dropped so each replica is asked once.
        metadata (`tuple`): call metadata (the bearer token).
        timeout (`float`): seconds each replica may take.

    Returns:
        `(address, reply)` of each replica that answered, in pool order.

    Raises:
        `TransportError`: no replica of the pool answered (naming the pool and the first error), or a replica
            refused the call for another reason than being down (bad token, TLS), naming that replica.
    """
    addresses = pools.addresses[party]
    with ThreadPoolExecutor(max_workers=len(addresses), thread_name_prefix="hss-ee-describe") as workers:
        results = list(workers.map(lambda a: _describe_one(a, credentials, options, metadata, timeout), addresses))
    answered = []
    for address, result in zip(addresses, results, strict=True):
        if not isinstance(result, grpc.RpcError):
            answered.append((address, result))
        elif result.code() == grpc.StatusCode.UNAVAILABLE:
            logger.warning(
                "replica %s of party %s is not reachable at connect (%s); its fingerprint will be checked by the "
                "server on each request",
                address,
                PARTY_NAMES[party],
                result.details(),
            )
        else:
            raise TransportError(
                address,
                f"{result.code().name}: {result.details()}; every replica of a party must accept this client's "
                "credentials (same CA, client certificate and token)",
            )
    if not answered:
        first = results[0]
        raise TransportError(
            pools.names[party],
            f"no replica of party {PARTY_NAMES[party]} is reachable ({first.details()}); start them with "
            "`hss-ee serve CHECKPOINT --port PORT` and check the hosts, ports and firewall",
        )
    return answered
