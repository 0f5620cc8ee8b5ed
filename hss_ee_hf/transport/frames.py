"""The data plane's wire format: length-prefixed binary frames, one TCP (or TLS) connection per party and caller.

gRPC stays the control plane (Describe, health, errors, fallback); stage calls may instead travel as frames on a
plain socket, which costs tens of microseconds per call where Python gRPC costs hundreds (DESIGN.md §8). Both
sides of the data plane ([`hss_ee_hf.server.socket_server`], [`hss_ee_hf.transport.socket_client`]) share only
this module.

Every frame is a 16-byte header and `length` more bytes:

```
offset  size  field
0       4     length      bytes after the header (little-endian u32)
4       1     kind        HELLO, HELLO_OK, STAGE, REPLY or ERROR
5       1     flag        STAGE: 0 = the body carries a share, 1 = a 32-byte seed, 2 / 3 = a convolution's 48-byte
                          geometry then a feature-map share / a seed (`geometry.py`); ERROR: status code;
                          HELLO: placement hint (0 none, 1 together, 2 apart; see `colocation.py`)
6       2     short       HELLO, HELLO_OK: protocol version; STAGE: length of the stage name
8       4     request_id  chosen by the client, echoed by the server (replies may be read out of order)
12      4     word        STAGE, REPLY: rows; HELLO_OK: the server's max_rows; HELLO: the hint's core
16      ...   body
```

* `HELLO` (client, first frame of a connection): body `b"HSEE"`, u16 token length, u16 fingerprint length, the
  bearer token (empty when none) and the checkpoint fingerprint the client expects. The server answers `HELLO_OK`
  or `ERROR` (then closes). A connection is bound to that fingerprint and protocol version: every stage call on it
  is validated against them exactly as a gRPC `StageRequest` carrying them would be.
* `STAGE`: body = the UTF-8 stage name padded with zeros to a multiple of 8 bytes (so the payload is 8-byte
  aligned), then the payload: `rows x in_features` little-endian int64 (party B's share) or a 32-byte seed
  (party A). The server answers `REPLY` (body: `rows x out_features` little-endian int64) or `ERROR`.
* `ERROR`: flag = index of the status in [`STATUS_NAMES`], body = a UTF-8 message (never payload bytes). A refused
  request leaves the connection open; only a frame the server cannot delimit (or an oversized one) closes it.

Nothing here is pickled or self-describing beyond these fields; every length is checked against a limit before
anything is read into memory.
"""

from __future__ import annotations

import socket
import struct

MAGIC = b"HSEE"
HEADER = struct.Struct("<IBBHII")
HEADER_BYTES = HEADER.size  # 16
HELLO_FIXED = struct.Struct("<4sHH")
HELLO, HELLO_OK, STAGE, REPLY, ERROR = 1, 2, 3, 4, 5
KIND_NAMES = {HELLO: "HELLO", HELLO_OK: "HELLO_OK", STAGE: "STAGE", REPLY: "REPLY", ERROR: "ERROR"}
INPUT_SHARE, INPUT_SEED = 0, 1
# A feature map and its convolution geometry (`geometry.py`) instead of rows: the server unfolds it.
INPUT_MAP_SHARE, INPUT_MAP_SEED = 2, 3
# Status names as gRPC spells them, so both planes report failures alike; an ERROR frame carries the index.
STATUS_NAMES = (
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "INTERNAL",
    "DEADLINE_EXCEEDED",
    "UNIMPLEMENTED",
)
STATUS_INDEX = {name: i for i, name in enumerate(STATUS_NAMES)}
MAX_STAGE_NAME_BYTES = 256
MAX_TOKEN_BYTES = 4096
MAX_FINGERPRINT_BYTES = 256
MAX_HELLO_BYTES = HELLO_FIXED.size + MAX_TOKEN_BYTES + MAX_FINGERPRINT_BYTES
MAX_ERROR_MESSAGE_BYTES = 4096
# A server with every data-plane connection slot taken refuses a new one with RESOURCE_EXHAUSTED and these words;
# the client then sends that server's stage calls over gRPC for a while.
SLOTS_FULL_DETAILS = "no data-plane connection slot free"


class FrameError(Exception):
    """A frame that breaks the format. `code` is the status to report; `fatal` frames end the connection.

    Args:
        message (`str`): what was wrong (never payload bytes).
        code (`str`, *optional*, defaults to `"INVALID_ARGUMENT"`): a name from [`STATUS_NAMES`].
        fatal (`bool`, *optional*): the stream cannot be delimited any more (or should not be read further).
    """

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT", fatal: bool = False):
        self.code, self.fatal = code, fatal
        super().__init__(message)


def padded(n: int) -> int:
    """`n` rounded up to a multiple of 8."""
    return (n + 7) & ~7


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    """Fills `view` from `sock`.

    Raises:
        `ConnectionResetError`: the peer closed the connection first.
        `TimeoutError`: the socket's timeout passed.
    """
    while len(view):
        got = sock.recv_into(view)
        if not got:
            raise ConnectionResetError("the peer closed the connection")
        view = view[got:]


def hello_frame(version: int, token: bytes, fingerprint: bytes, hint: tuple[int, int] = (0, 0)) -> bytes:
    """The first frame of a connection: magic, bearer token, expected checkpoint fingerprint.

    `hint` is `(mode, core)`: where a server on the same machine should run this connection's thread
    ([`hss_ee_hf.transport.colocation`]); `(0, 0)` says nothing.
    """
    if len(token) > MAX_TOKEN_BYTES or len(fingerprint) > MAX_FINGERPRINT_BYTES:
        raise ValueError(f"token or fingerprint too long (at most {MAX_TOKEN_BYTES} and {MAX_FINGERPRINT_BYTES})")
    body = HELLO_FIXED.pack(MAGIC, len(token), len(fingerprint)) + token + fingerprint
    mode, core = hint
    return HEADER.pack(len(body), HELLO, mode, version, 0, core) + body


def parse_hello(body: memoryview) -> tuple[bytes, bytes]:
    """`(token, fingerprint)` of a HELLO body.

    Raises:
        `FrameError`: the body is not a HELLO of this format.
    """
    if len(body) < HELLO_FIXED.size:
        raise FrameError("the first frame is not an hss-ee data-plane HELLO", fatal=True)
    magic, token_len, fp_len = HELLO_FIXED.unpack_from(body)
    if magic != MAGIC or HELLO_FIXED.size + token_len + fp_len != len(body):
        raise FrameError("the first frame is not an hss-ee data-plane HELLO", fatal=True)
    token = bytes(body[HELLO_FIXED.size : HELLO_FIXED.size + token_len])
    return token, bytes(body[HELLO_FIXED.size + token_len :])


def error_frame(request_id: int, code: str, message: str) -> bytes:
    """An ERROR frame; the message is cut to [`MAX_ERROR_MESSAGE_BYTES`]."""
    body = message.encode("utf-8", errors="replace")[:MAX_ERROR_MESSAGE_BYTES]
    return HEADER.pack(len(body), ERROR, STATUS_INDEX.get(code, 0), 0, request_id, 0) + body


def status_name(index: int) -> str:
    """The status an ERROR frame's flag names (`UNKNOWN` for an index out of range)."""
    return STATUS_NAMES[index] if 0 <= index < len(STATUS_NAMES) else "UNKNOWN"


def padded_name(stage: str) -> bytes:
    """A stage name as a STAGE frame carries it: UTF-8, zero-padded to a multiple of 8 bytes."""
    name = stage.encode("utf-8")
    return name + bytes(padded(len(name)) - len(name))


def stage_header(
    buf: bytearray,
    request_id: int,
    stage: bytes,
    rows: int,
    seed: bool,
    payload_bytes: int,
    name_len: int = -1,
    feature_map: bool = False,
) -> int:
    """Writes a STAGE header and the stage name at the start of `buf`; returns the payload's offset.

    `stage` is the UTF-8 name, or (with `name_len`, its unpadded length) the name already padded by [`padded_name`].
    """
    if name_len < 0:
        name_len, stage = len(stage), stage + bytes(padded(len(stage)) - len(stage))
    offset = HEADER_BYTES + len(stage)
    flag = (INPUT_MAP_SEED if seed else INPUT_MAP_SHARE) if feature_map else (INPUT_SEED if seed else INPUT_SHARE)
    HEADER.pack_into(buf, 0, len(stage) + payload_bytes, STAGE, flag, name_len, request_id, rows)
    buf[HEADER_BYTES:offset] = stage
    return offset


class FrameReader:
    """Reads frames from one socket through a buffer the connection keeps; a view stays valid until the next read."""

    __slots__ = ("sock", "buf", "view", "pos", "end")

    def __init__(self, sock: socket.socket, size: int = 1 << 16):
        self.sock, self.buf = sock, bytearray(size)
        self.view, self.pos, self.end = memoryview(self.buf), 0, 0

    def read(self, n: int) -> memoryview:
        """The next `n` bytes (one `recv` for a whole small frame in the common case).

        Raises:
            `ConnectionResetError`: the peer closed the connection.
        """
        if self.end - self.pos < n:
            self._fill(n)
        start = self.pos
        self.pos = start + n
        return self.view[start : start + n]

    def _fill(self, n: int) -> None:
        have = self.end - self.pos
        if not have or len(self.buf) - self.pos < n:  # start over at the front (compacting, or growing)
            kept = bytes(self.view[self.pos : self.end]) if have else b""
            if len(self.buf) < n:
                # a new buffer, never a resize: views handed out earlier may still be alive
                self.buf = bytearray(max(n, 2 * len(self.buf)))
                self.view = memoryview(self.buf)
            self.view[:have] = kept
            self.pos, self.end = 0, have
        while self.end - self.pos < n:
            got = self.sock.recv_into(self.view[self.end :])
            if not got:
                raise ConnectionResetError("the peer closed the connection")
            self.end += got

    def read_into(self, dest: memoryview) -> None:
        """Fills `dest` with the next `len(dest)` bytes: what is buffered, then straight from the socket.

        Raises:
            `ConnectionResetError`: the peer closed the connection.
        """
        have = min(self.end - self.pos, len(dest))
        if have:
            dest[:have] = self.view[self.pos : self.pos + have]
            self.pos += have
        if have < len(dest):
            recv_exactly(self.sock, dest[have:])
