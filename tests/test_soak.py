"""Soak: many concurrent sessions for several rounds against two real `hss-ee serve` processes, then a graceful drain.

Sixteen sessions (one client model and one gRPC connection each, one thread each) generate greedily for several
rounds against two share servers started as `hss-ee serve` subprocesses. Checked:

* every output equals the plaintext model's, token for token;
* each server's resident memory after the last round is at most 1.1x what it was after the first (no leak per call);
* neither server's log holds an error or a traceback;
* then, with the sessions generating, server B gets SIGTERM: it stops taking new calls, finishes those in flight and
  exits with status 0 within its grace period; every generation either completes with exact tokens or fails with a
  `TransportError` that names server B's address (no wrong token, no other error).

Marked slow; bounded to a few minutes on a 2-core runner (`SOAK_ROUNDS` and `SOAK_SESSIONS` scale it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import clear_prompts, convert_tiny  # noqa: E402

from hss_ee_hf import HSSEEForCausalLM, TransportError  # noqa: E402
from hss_ee_hf.cli.demo import free_port  # noqa: E402
from hss_ee_hf.transport.config import HSSEEClientConfig  # noqa: E402
from hss_ee_hf.transport.protos import hss_ee_pb2, hss_ee_pb2_grpc  # noqa: E402

SESSIONS = int(os.environ.get("SOAK_SESSIONS", "16"))
ROUNDS = int(os.environ.get("SOAK_ROUNDS", "6"))
NEW_TOKENS = 8
RSS_GROWTH = 1.1
DRAIN_ROUNDS = 4
DRAIN_AFTER_SECONDS = 0.5  # into the drain phase, when every session is inside a generation
GRACE_SECONDS = 5.0  # `hss-ee serve`'s default grace (DEFAULT_GRACE_SECONDS)
# What a healthy server log may not contain.
LOG_ERRORS = re.compile(r"Traceback|ERROR|CRITICAL|Exception")

pytestmark = pytest.mark.slow


class ServeProcess:
    """One `hss-ee serve` subprocess on a free loopback port, logging to a file."""

    def __init__(self, checkpoint: Path, log: Path):
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in `stop`
        cmd = [sys.executable, "-m", "hss_ee_hf.cli", "-v", "serve", str(checkpoint), "--port", str(self.port)]
        cmd += ["--threads", "1", "--workers", str(4 * SESSIONS)]  # each session holds a stream per server
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server {self.endpoint} exited: {self.log()}")
            # One server alone: a transport would refuse it as both parties, so ask its Describe directly.
            with grpc.insecure_channel(self.endpoint) as channel:
                try:
                    hss_ee_pb2_grpc.ShareServerStub(channel).Describe(hss_ee_pb2.DescribeRequest(), timeout=2.0)
                    return
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
            time.sleep(0.3)

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text(encoding="ascii")
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=GRACE_SECONDS + 15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    return convert_tiny("llama", tmp_path_factory.mktemp("soak-llama"))


def _generate(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0].tolist()


def _run_sessions(
    models, prompts, expected, rounds: int, on_round=None
) -> tuple[list[tuple[float, float, str]], list[BaseException]]:
    """Each session generates `rounds` prompts in its own thread; rounds are in step (a barrier after each).

    Returns:
        `(start, end, outcome)` of every generation (`"exact"`, `"wrong"` or the exception's type name), and the
        exceptions.
    """
    outcomes: list[tuple[float, float, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(models), action=on_round)

    def session(s: int) -> None:
        for r in range(rounds):
            i = (r * len(models) + s) % len(prompts)
            start = time.monotonic()
            try:
                got = _generate(models[s], prompts[i])
                kind = "exact" if got == expected[i] else "wrong"
            except BaseException as err:  # noqa: BLE001 - every failure is counted and checked by the caller
                kind = type(err).__name__
                with lock:
                    errors.append(err)
            with lock:
                outcomes.append((start, time.monotonic(), kind))
            barrier.wait(timeout=300)

    threads = [threading.Thread(target=session, args=(s,)) for s in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return outcomes, errors


def test_soak_sessions_rounds_memory_logs_and_graceful_drain(tiny, tmp_path: Path) -> None:
    original, folder, key = tiny
    prompts = clear_prompts(original, 4 * SESSIONS, seed=17, new_tokens=NEW_TOKENS)
    expected = [_generate(original, p) for p in prompts]
    servers = [ServeProcess(folder, tmp_path / f"server-{name}.log") for name in "AB"]
    models = []
    try:
        for server in servers:
            server.wait_ready()
        endpoints = tuple(server.endpoint for server in servers)
        config = HSSEEClientConfig(timeout=30.0, retries=3, initial_backoff=0.05)
        models = [
            HSSEEForCausalLM.from_pretrained(folder, key=key, endpoints=endpoints, client_config=config)
            for _ in range(SESSIONS)
        ]
        rss: list[list[int]] = []
        started = time.monotonic()
        outcomes, errors = _run_sessions(
            models, prompts, expected, ROUNDS, on_round=lambda: rss.append([s.rss_kib() for s in servers])
        )
        soak_seconds = time.monotonic() - started
        assert not errors, f"{len(errors)} generations raised, first: {errors[0]!r}"
        assert Counter(kind for _, _, kind in outcomes) == Counter(exact=SESSIONS * ROUNDS)
        first, last = rss[0], rss[-1]
        print(
            f"\nsoak: {SESSIONS} sessions x {ROUNDS} rounds = {SESSIONS * ROUNDS} generations of {NEW_TOKENS} tokens "
            f"in {soak_seconds:.1f} s, all exact; server RSS after round 1 A={first[0]} KiB B={first[1]} KiB, after "
            f"round {ROUNDS} A={last[0]} KiB B={last[1]} KiB (x{last[0] / first[0]:.3f}, x{last[1] / first[1]:.3f})"
        )
        for server, before, after in zip(servers, first, last, strict=True):
            assert after <= RSS_GROWTH * before, f"{server.endpoint} grew from {before} to {after} KiB"
        for server in servers:
            assert not LOG_ERRORS.search(server.log()), f"{server.endpoint} logged an error:\n{server.log()}"

        # Graceful drain: SIGTERM server B while every session is generating.
        server_b = servers[1]
        sigterm_at: list[float] = []

        def terminate_b_soon() -> None:
            time.sleep(DRAIN_AFTER_SECONDS)
            sigterm_at.append(time.monotonic())
            server_b.proc.send_signal(signal.SIGTERM)

        threading.Thread(target=terminate_b_soon).start()
        drain, drain_errors = _run_sessions(models, prompts, expected, rounds=DRAIN_ROUNDS)
        rc = server_b.proc.wait(timeout=GRACE_SECONDS + 15)
        stopped_at = time.monotonic()
        kinds = Counter(kind for _, _, kind in drain)
        in_flight = [kind for start, end, kind in drain if start < sigterm_at[0] < end]
        print(
            f"drain: SIGTERM to B {DRAIN_AFTER_SECONDS} s into {SESSIONS} sessions x {DRAIN_ROUNDS} rounds; "
            f"{len(in_flight)} generations in flight then, {in_flight.count('exact')} of them completed exactly; "
            f"B exited with status {rc} {stopped_at - sigterm_at[0]:.1f} s after SIGTERM; outcomes {dict(kinds)}; "
            f"first error: {str(drain_errors[0])[:160] if drain_errors else None}"
        )
        assert kinds["wrong"] == 0
        assert rc == 0
        assert in_flight.count("exact") > 0, "no generation in flight at SIGTERM completed: B did not drain"
        unnamed = [e for e in drain_errors if not (isinstance(e, TransportError) and e.endpoint == server_b.endpoint)]
        assert not unnamed, f"errors that do not name server B ({server_b.endpoint}): {unnamed[:3]!r}"
        # Every failure is a refused new call (UNAVAILABLE), none a call cut off while B computed it.
        assert all("UNAVAILABLE" in str(e) for e in drain_errors), drain_errors[:3]
        assert drain_errors, "no session noticed that server B went away"
        log_b = server_b.log()
        assert "received SIGTERM, shutting down" in log_b and "stopped" in log_b
        assert not LOG_ERRORS.search(log_b), f"server B logged an error while draining:\n{log_b}"
    finally:
        for model in models:
            model.close()
        for server in servers:
            server.stop()
