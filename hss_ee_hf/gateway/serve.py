"""Starting the gateway: read the API key, check the bind address, load the client model, run uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import stat
import sys
from pathlib import Path

from hss_ee_hf import HSSEEClientConfig, HSSEEError

logger = logging.getLogger(__name__)


class GatewayConfigError(HSSEEError, ValueError):
    """The gateway cannot start as configured (API key file, bind address); the message says what to change."""


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only (`localhost`, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def warn_if_exposed(host: str, has_api_key: bool) -> None:
    """Logs a warning when the gateway, which sees plaintext, is bound beyond this machine."""
    if is_loopback(host):
        return
    if not has_api_key:
        logger.warning(
            "the hss-ee gateway is bound to %s without an API key: anyone who can reach it can use the model, and "
            "prompts and answers are plaintext here. Bind to 127.0.0.1 or pass --api-key-file",
            host,
        )
    logger.warning(
        "the hss-ee gateway on %s speaks plain HTTP: put a TLS proxy in front of it before using it across a network",
        host,
    )


def read_api_key(path: str | os.PathLike) -> str:
    """Reads the API key clients must present (the file's one line, surrounding whitespace removed).

    Raises:
        `GatewayConfigError`: the file is missing, unreadable or empty.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
        mode = file.stat().st_mode
    except (OSError, UnicodeDecodeError) as err:
        raise GatewayConfigError(f"cannot read the API key file {file}: {err}") from None
    key = text.strip()
    if not key or any(c.isspace() for c in key):
        raise GatewayConfigError(f"the API key file {file} must hold one key (one line, no spaces)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("the API key file %s is readable by other users; run `chmod 600 %s`", file, file)
    return key


def default_model_name(checkpoint: str) -> str:
    """The model id served when none is given: a local checkpoint's folder name, or the Hub repo id."""
    path = Path(checkpoint)
    return path.resolve().name if path.is_dir() else checkpoint


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise GatewayConfigError(f"cannot listen on {host}:{port} ({err}); pick another --port or --host") from None
    return sock


def run_gateway(
    checkpoint: str,
    *,
    key: str | os.PathLike,
    endpoints: tuple[str, str],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_file: str | os.PathLike | None = None,
    model_name: str | None = None,
    max_tokens: int = 1024,
    max_queue: int = 64,
    threads: int | None = None,
    verify: bool = False,
    client_config: HSSEEClientConfig | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    verbose: bool = False,
) -> int:
    """Loads the client side of `checkpoint` and serves it over HTTP until interrupted (what `hss-ee gateway` runs).

    Args:
        checkpoint (`str`): EE checkpoint folder or Hub repo id.
        key, endpoints, client_config, verify, revision, cache_dir: as in `HSSEEForCausalLM.from_pretrained`.
        host (`str`, *optional*, defaults to `"127.0.0.1"`): address to bind; anything but loopback logs a warning.
        port (`int`, *optional*, defaults to 8000): TCP port (0 picks a free one; the URL printed says which).
        api_key_file (path, *optional*): file with the key clients must send as a bearer token.
        model_name (`str`, *optional*): the model id served (default: [`default_model_name`]).
        max_tokens, max_queue: as in [`GatewayModel`].
        threads (`int`, *optional*): torch compute threads.
        verbose (`bool`, *optional*): log each request line (never bodies).

    Returns:
        The exit status, 0.
    """
    import torch
    import uvicorn
    from transformers import AutoTokenizer

    from hss_ee_hf import HSSEEForCausalLM

    from .app import create_app
    from .manager import GatewayModel

    api_key = read_api_key(api_key_file) if api_key_file is not None else None
    warn_if_exposed(host, api_key is not None)
    if threads is not None:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, revision=revision, cache_dir=cache_dir)
    model = HSSEEForCausalLM.from_pretrained(
        checkpoint,
        key=key,
        endpoints=endpoints,
        client_config=client_config,
        verify=verify,
        revision=revision,
        cache_dir=cache_dir,
    )
    manager = GatewayModel(
        model,
        tokenizer,
        model_id=model_name or default_model_name(checkpoint),
        max_tokens=max_tokens,
        max_queue=max_queue,
    )
    try:
        sock = _bind(host, port)
        config = uvicorn.Config(
            create_app(manager, api_key=api_key),
            log_level="info" if verbose else "warning",
            access_log=verbose,
        )
        shown = f"[{host}]" if ":" in host else host
        print(f"hss-ee gateway: serving {manager.model_id!r} at http://{shown}:{sock.getsockname()[1]}/v1", flush=True)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: for SIGTERM (how service
        # managers stop a server) exit 0 after closing the model rather than die in the default handler.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        manager.close()
        model.close()
    return 0
