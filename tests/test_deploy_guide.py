"""docs/deploy.md runs as written: its tested bash blocks, on loopback, with real `hss-ee` processes.

A block preceded by `<!-- test -->` runs to completion in one working folder, in order; one preceded by
`<!-- test: serve HOST -->` is a server, started in the background on HOST's loopback port. Host names
(`a1.example.org:50051` ...) become loopback addresses, and SmolLM2 a tiny Llama, so the guide cannot rot.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import save_tiny  # noqa: E402

GUIDE = Path(__file__).parent.parent / "docs" / "deploy.md"
HOSTS = ("a1", "a2", "b1", "b2")
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_BLOCK = re.compile(r"<!-- test(?:: serve (\w+))? -->\n```bash\n(.*?)```", re.DOTALL)


def guide_blocks() -> list[tuple[str | None, str]]:
    """`(host or None, commands)` of every tested block, in guide order."""
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(GUIDE.read_text(encoding="utf-8"))]


def _free_port(taken: set[int]) -> int:
    """A free port whose successor is free too: `hss-ee serve` puts its data plane on PORT+1 by default."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if {port, port + 1} & taken or port >= 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        taken.update((port, port + 1))
        return port


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_guide_marks_its_commands_for_testing():
    blocks = guide_blocks()
    assert sorted(h for h, _ in blocks if h) == sorted(HOSTS)
    commands = "".join(text for _, text in blocks)
    for needed in ("hss-ee convert", "hss-ee certs", "hss-ee generate", "--tls-client-ca", "--token-file", "Health"):
        assert needed in commands, f"docs/deploy.md has no tested block with {needed}"


@pytest.mark.slow  # six fresh interpreters importing torch: about 40 s idle, more on a busy runner
def test_deploy_guide_commands_run_on_loopback(tmp_path: Path):
    src = tmp_path / "tiny-src"
    save_tiny("llama", src)
    taken: set[int] = set()
    ports = {host: _free_port(taken) for host in HOSTS}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = str(Path(__file__).parent.parent)

    def localise(text: str, host: str | None) -> str:
        text = text.replace(MODEL_ID, str(src))
        for name, port in ports.items():
            text = text.replace(f"{name}.example.org:50051", f"127.0.0.1:{port}")
        if host is not None:  # a server: its own port, loopback only, one compute thread (a small runner)
            text = text.replace("--host 0.0.0.0", "--host 127.0.0.1").replace("--port 50051", f"--port {ports[host]}")
            text = text.strip() + " --threads 1 --workers 8\n"
        return text

    servers: list[subprocess.Popen] = []
    outputs: list[str] = []
    try:
        for host, text in guide_blocks():
            script = localise(text, host)
            if host is not None:
                log = open(tmp_path / f"{host}.log", "w")  # noqa: SIM115 - closed with the process
                servers.append(
                    subprocess.Popen(["bash", "-c", "exec " + script], cwd=tmp_path, env=env, stdout=log, stderr=log)
                )
                continue
            _wait_for(servers, ports, tmp_path)
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert done.returncode == 0, f"{script}\nfailed:\n{done.stdout}\n{done.stderr}"
            outputs.append(done.stdout)
    finally:
        for proc in servers:
            proc.terminate()
        for proc in servers:
            proc.wait(timeout=30)
    assert all(proc.returncode == 0 for proc in servers), [p.returncode for p in servers]  # SIGTERM: clean stop
    assert outputs[-1].strip() == "SERVING"
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    ids = tokenizer("Name three colours.", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    plain = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert plain.strip() in outputs[-2], (plain, outputs[-2])  # the private generation's text


def _wait_for(servers: list[subprocess.Popen], ports: dict[str, int], folder: Path, limit: float = 120.0) -> None:
    """Waits until every started server listens (they load the checkpoint first)."""
    deadline = time.monotonic() + limit
    for proc, (host, port) in zip(servers, ports.items(), strict=False):
        while not _listening(port):
            if proc.poll() is not None:
                pytest.fail(f"server {host} exited with {proc.returncode}:\n{(folder / f'{host}.log').read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"server {host} did not listen on {port} within {limit:g} s")
            time.sleep(0.2)
