"""Convolutions as feature maps: each server unfolds its own share (`transport/geometry.py`, `server/unfold.py`).

The servers' unfolding must give exactly the patches `F.unfold` gives the client, so a classification through the
feature-map path equals the im2col path bit for bit (the ring products are the same integers), in-process and on the
data plane, with fewer bytes sent; a wrong or hostile geometry is refused with a typed status and the server keeps
serving.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F
from tiny_families import convert_tiny_family

from hss_ee_hf import HSSEEForImageClassification
from hss_ee_hf.errors import StageRequestError
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.grpc_server import start_server
from hss_ee_hf.server.unfold import unfold_share
from hss_ee_hf.transport.base import PROTOCOL_VERSION
from hss_ee_hf.transport.frames import (
    ERROR,
    HEADER,
    HEADER_BYTES,
    HELLO_OK,
    REPLY,
    FrameReader,
    hello_frame,
    stage_header,
    status_name,
)
from hss_ee_hf.transport.geometry import GEOMETRY_BYTES, ConvGeometry
from hss_ee_hf.transport.inprocess import InProcessTransport

pytestmark = pytest.mark.usefixtures("torch_single_thread")

GEOMETRIES = [
    ConvGeometry(3, 9, 7, 3, 3, 1, 1, 1, 1),
    ConvGeometry(2, 8, 8, 7, 7, 2, 2, 3, 3),
    ConvGeometry(4, 5, 6, 1, 1),
    ConvGeometry(3, 10, 9, 2, 3, 2, 1, 0, 1, 2, 1),  # non-square kernel, dilation
    ConvGeometry(1, 1, 1, 1, 1),
    ConvGeometry(5, 4, 4, 4, 4, 4, 4),  # ViT's patch embedding: stride = kernel
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_server_unfolding_equals_the_clients_patches(geometry):
    g = geometry
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-(2**63), 2**63 - 1, (2, g.channels, g.height, g.width), generator=gen)
    got = unfold_share(x, g)
    assert got.shape == (2 * g.patches, g.patch_features)
    # the client's order: F.unfold on the same values (small integers are exact in float64), then transpose
    small = torch.randint(-1000, 1000, x.shape, generator=gen)
    want = F.unfold(
        small.double(), (g.kernel_h, g.kernel_w), dilation=(g.dilation_h, g.dilation_w),
        padding=(g.pad_h, g.pad_w), stride=(g.stride_h, g.stride_w),
    ).transpose(1, 2).reshape(-1, g.patch_features)  # fmt: skip
    assert torch.equal(unfold_share(small, g), want.to(torch.int64))
    assert ConvGeometry.unpack(g.pack()) == g


@pytest.mark.parametrize(
    "fields",
    [
        (0, 4, 4, 3, 3, 1, 1, 0, 0, 1, 1),  # no channels
        (1, 4, 4, 3, 3, 0, 1, 0, 0, 1, 1),  # stride 0
        (1, 2, 2, 5, 5, 1, 1, 0, 0, 1, 1),  # kernel larger than the input
        (1, 4, 4, 3, 3, 1, 1, 3, 0, 1, 1),  # padding as large as the kernel
        (1, 1 << 17, 4, 1, 1, 1, 1, 0, 0, 1, 1),  # absurd size
    ],
)
def test_bad_geometries_are_refused(fields):
    with pytest.raises(ValueError):
        ConvGeometry(*fields).check()
    with pytest.raises(ValueError):
        ConvGeometry.unpack(ConvGeometry(*fields).pack())
    with pytest.raises(ValueError):
        ConvGeometry.unpack(b"\0" * (GEOMETRY_BYTES - 8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    plain, folder, key = convert_tiny_family("resnet-bottleneck", tmp_path_factory.mktemp("maps"))
    return plain, folder, key, StageEngine(folder)


def _logits(model, pixels) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def test_feature_maps_equal_patches_in_process_and_on_the_data_plane(tiny):
    _, folder, key, engine = tiny
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with HSSEEForImageClassification.from_pretrained(folder, key=key, transport=InProcessTransport(engine)) as model:
        transport = model.hss_ee_client.transport
        transport.feature_maps = False  # the client unfolds: the reference
        patches = _logits(model, pixels)
        sent_patches = model.hss_ee_stats.bytes_sent
        model.hss_ee_stats.reset()
        transport.feature_maps = True
        maps = _logits(model, pixels)
        sent_maps = model.hss_ee_stats.bytes_sent
    assert torch.equal(maps, patches)
    assert sent_maps < sent_patches
    servers = [start_server(engine, "127.0.0.1", 0) for _ in range(2)]
    try:
        endpoints = tuple(f"127.0.0.1:{port}" for _, port in servers)
        with HSSEEForImageClassification.from_pretrained(folder, key=key, endpoints=endpoints, timeout=30.0) as model:
            wire = _logits(model, pixels)
            assert model.hss_ee_client.transport.data_plane_calls > 0
            assert model.hss_ee_stats.bytes_sent == sent_maps
    finally:
        for server, _ in servers:
            server.stop(None)
    assert torch.equal(wire, patches)  # and the patches path equals plaintext (tests/test_secure_vision.py)


def test_engine_refuses_a_geometry_that_does_not_fit_the_stage(tiny):
    engine = tiny[3]
    stage, (in_features, _) = next((s, d) for s, d in engine.describe().items() if d[0] > 1)
    wrong = ConvGeometry(in_features + 1, 4, 4, 1, 1)
    with pytest.raises(StageRequestError, match="makes patches of"):
        engine.compute(engine.fingerprint, stage, 1, share=bytes(8 * wrong.map_elements), geometry=wrong)
    right = ConvGeometry(in_features, 4, 4, 1, 1)
    with pytest.raises(StageRequestError, match="bytes"):  # a payload of the wrong length
        engine.compute(engine.fingerprint, stage, 1, share=bytes(8 * (right.map_elements - 1)), geometry=right)
    out = engine.compute(engine.fingerprint, stage, 2, share=bytes(16 * right.map_elements), geometry=right)
    assert len(out) == 2 * 16 * engine.describe()[stage][1] * 8


def test_data_plane_refuses_bad_feature_map_frames_and_keeps_serving(tiny):
    engine = tiny[3]
    stage, (in_features, out_features) = next((s, d) for s, d in engine.describe().items() if d[0] > 1)
    server, _ = start_server(engine, "127.0.0.1", 0)
    try:
        sock = socket.create_connection(("127.0.0.1", server.data_port), timeout=10.0)
        sock.sendall(hello_frame(PROTOCOL_VERSION, b"", engine.fingerprint.encode()))
        reader = FrameReader(sock)
        assert HEADER.unpack(reader.read(HEADER_BYTES))[1] == HELLO_OK

        def call(request_id: int, geometry: bytes, payload: bytes, rows: int = 1):
            body = geometry + payload
            buf = bytearray(HEADER_BYTES + 256 + len(body))
            offset = stage_header(buf, request_id, stage.encode(), rows, False, len(body), feature_map=True)
            buf[offset : offset + len(body)] = body
            sock.sendall(bytes(buf[: offset + len(body)]))
            length, kind, flag, _, got_id, _ = HEADER.unpack(reader.read(HEADER_BYTES))
            data = bytes(reader.read(length))
            assert got_id == request_id
            return kind, (status_name(flag) if kind == ERROR else ""), data

        good = ConvGeometry(in_features, 3, 5, 1, 1)
        share = bytes(8 * good.map_elements)
        for i, (geometry, payload) in enumerate(
            [
                (b"\xff" * GEOMETRY_BYTES, share),  # garbage geometry
                (b"\x01" * 7, b""),  # shorter than a geometry
                (ConvGeometry(in_features + 1, 3, 5, 1, 1).pack(), share),  # does not fit the stage
                (good.pack(), share[:-8]),  # share one element short
            ],
            start=1,
        ):
            kind, code, _ = call(i, geometry, payload)
            assert (kind, code) == (ERROR, "INVALID_ARGUMENT")
        kind, _, data = call(99, good.pack(), share)  # the connection still serves
        assert kind == REPLY and len(data) == good.patches * out_features * 8
        sock.close()
    finally:
        server.stop(None)
