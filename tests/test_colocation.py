"""Client and servers on one machine: the HELLO's placement hint and the client's pinning (`colocation.py`).

The hint only places threads; these tests check that a server follows it for a loopback client (party B's thread on
the client's core, party A's on the others), ignores a hint it cannot follow, that generation stays exact with and
without it, and that the client's thread gets its cores back after `generate()`.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from hss_ee_hf.client.modeling import HSSEEForCausalLM
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.socket_server import DataPlaneServer
from hss_ee_hf.transport import colocation
from hss_ee_hf.transport.base import PROTOCOL_VERSION
from hss_ee_hf.transport.config import HSSEEClientConfig
from hss_ee_hf.transport.frames import HEADER, HEADER_BYTES, HELLO, HELLO_OK, FrameReader, hello_frame

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import convert_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

two_cores = pytest.mark.skipif(not colocation.supported(), reason="needs Linux thread affinity and two cores")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    plain, folder, key = convert_tiny("llama", tmp_path_factory.mktemp("colocation-llama"))
    return plain, folder, key, StageEngine(folder, max_rows=64)


def _hello_and_wait(plane: DataPlaneServer, fingerprint: str, hint: tuple[int, int]) -> tuple[socket.socket, int]:
    """Opens a connection with `hint`; returns it and the native id of the server thread that serves it."""
    sock = socket.create_connection(("127.0.0.1", plane.port), timeout=5.0)
    sock.sendall(hello_frame(PROTOCOL_VERSION, b"", fingerprint.encode(), hint))
    length, kind, *_ = HEADER.unpack(FrameReader(sock).read(HEADER_BYTES))
    assert kind == HELLO_OK and length == 0
    mine = sock.getsockname()
    with plane._lock:
        (thread,) = [t for s, t in plane._connections.items() if s.fileno() != -1 and s.getpeername() == mine]
    return sock, thread.native_id


def test_hello_carries_the_hint_in_its_header():
    frame = hello_frame(PROTOCOL_VERSION, b"t", b"f" * 8, (colocation.APART, 3))
    length, kind, flag, version, request_id, word = HEADER.unpack(frame[:HEADER_BYTES])
    assert (kind, flag, version, request_id, word) == (HELLO, colocation.APART, PROTOCOL_VERSION, 0, 3)
    assert length == len(frame) - HEADER_BYTES
    plain = hello_frame(PROTOCOL_VERSION, b"t", b"f" * 8)
    assert HEADER.unpack(plain[:HEADER_BYTES])[2] == 0 and HEADER.unpack(plain[:HEADER_BYTES])[5] == 0


@two_cores
def test_server_thread_follows_a_loopback_hint(tiny):
    engine = tiny[3]
    allowed = os.sched_getaffinity(0)
    core = max(allowed)
    plane = DataPlaneServer(engine).start()
    try:
        together, tid = _hello_and_wait(plane, engine.fingerprint, (colocation.TOGETHER, core))
        assert os.sched_getaffinity(tid) == {core}
        apart, tid = _hello_and_wait(plane, engine.fingerprint, (colocation.APART, core))
        assert os.sched_getaffinity(tid) == allowed - {core}
        # a core this process may not use, an unknown mode, or no hint: the thread keeps every core
        for hint in ((colocation.TOGETHER, 4096), (7, core), (0, core)):
            sock, tid = _hello_and_wait(plane, engine.fingerprint, hint)
            assert os.sched_getaffinity(tid) == allowed
            sock.close()
        together.close()
        apart.close()
    finally:
        plane.stop(0.5).wait(5.0)
    assert os.sched_getaffinity(0) == allowed  # the test's own thread was never moved


def test_follow_hint_ignores_what_it_cannot_follow(monkeypatch):
    assert colocation.follow_hint(0, 0) is None
    assert colocation.follow_hint(9, 0) is None
    monkeypatch.setenv("HSS_EE_COLOCATE", "0")
    assert not colocation.enabled() and not colocation.supported()
    assert colocation.follow_hint(colocation.TOGETHER, 0) is None


@two_cores
def test_pinned_restores_the_cores():
    allowed = os.sched_getaffinity(0)
    core = min(allowed)
    with colocation.pinned(core):
        assert os.sched_getaffinity(0) == {core}
    assert os.sched_getaffinity(0) == allowed
    with colocation.pinned(None), colocation.pinned(10_000):  # nothing asked, or a core we may not use
        assert os.sched_getaffinity(0) == allowed
    assert colocation.home_cpu() in allowed


@two_cores
@pytest.mark.parametrize("colocate", [True, False])
def test_generation_is_exact_and_the_client_gets_its_cores_back(tiny, colocate):
    from hss_ee_hf.server.grpc_server import start_server

    plain, folder, key, engine = tiny
    started = [start_server(engine, "127.0.0.1", 0, max_workers=4) for _ in range(2)]
    allowed = os.sched_getaffinity(0)
    seen: list[set[int]] = []
    try:
        endpoints = tuple(f"127.0.0.1:{port}" for _, port in started)
        config = HSSEEClientConfig(timeout=10.0, colocate=colocate)
        with HSSEEForCausalLM.from_pretrained(folder, key=key, endpoints=endpoints, client_config=config) as model:
            transport = model.hss_ee_client.transport
            assert transport.colocated is colocate
            stage_run = model.hss_ee_client.run

            def watched(stage, x):  # the calling thread's cores while it makes a stage call
                seen.append(os.sched_getaffinity(0))
                return stage_run(stage, x)

            model.hss_ee_client.run = watched
            ids = torch.tensor([[1, 5, 9, 17, 33, 40]])
            kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
            secure = model.generate(ids, **kw)
            assert transport.data_plane_calls > 0
        assert torch.equal(secure, plain.float().eval().generate(ids, **kw))
    finally:
        for server, _ in started:
            server.stop(None)
    assert os.sched_getaffinity(0) == allowed
    assert seen
    expected = seen[0] if colocate else allowed
    assert all(cores == expected for cores in seen)
    assert len(expected) == 1 if colocate else expected == allowed
