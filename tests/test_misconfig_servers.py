"""Misconfiguration through real `hss-ee serve` processes (issue 19, rows 1, 3, 4 and 6).

* One server reached under two names (`127.0.0.1` and `localhost`, or two loopback addresses of a server bound to
  all interfaces) is refused before any share is sent.
* A server whose shard was edited, or whose config.json lost a layer, refuses to start and names what changed;
  `--trust-checkpoint` skips the check.
* `hss-ee generate --prompt-file -` reads the prompt from stdin.
* A server restarted during generation is waited for, and used as soon as it is back.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from server_processes import ServerProcess, servers
from tiny_models import convert_tiny

from hss_ee_hf import HSSEEForCausalLM
from hss_ee_hf.cli.main import main
from hss_ee_hf.errors import PartyOverlapError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    _, out, key = convert_tiny("llama", tmp_path_factory.mktemp("misconfig"))
    return out, key


@pytest.fixture(scope="module")
def pair(converted):
    with servers(converted[0]) as procs:
        yield procs


def test_one_server_under_two_names_is_refused(converted):
    out, key = converted
    server = ServerProcess(out, args=["--host", "0.0.0.0"]).wait_ready()
    try:
        port = server.port
        with pytest.raises(PartyOverlapError, match="same address") as info:
            HSSEEForCausalLM.from_pretrained(out, key=key, endpoints=(f"127.0.0.1:{port}", f"localhost:{port}"))
        assert "reconstruct" in str(info.value)  # says why it matters
        # different addresses, one process: caught by the instance id the server reports
        with pytest.raises(PartyOverlapError, match="same server process"):
            HSSEEForCausalLM.from_pretrained(out, key=key, endpoints=(f"127.0.0.1:{port}", f"127.0.0.2:{port}"))
        assert "refused a stage request" not in server.stderr()
    finally:
        server.stop()


def test_cli_refuses_one_server_twice(converted, pair, tmp_path, capsys):
    out, key = converted
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("w5 w6", encoding="utf-8")
    port = pair[0].port
    argv = ["generate", str(out), "--prompt-file", str(prompt), "--key", str(key), "--max-new-tokens", "2"]
    code = main([*argv, "--endpoints", f"127.0.0.1:{port}", f"localhost:{port}"])
    captured = capsys.readouterr()
    assert code == 2 and "PartyOverlapError" in captured.err and "Traceback" not in captured.err


def _edited_copy(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(out, copy)
    return copy


def test_edited_shard_refuses_to_start_and_is_named(converted, tmp_path):
    copy = _edited_copy(converted[0], tmp_path)
    weight_map = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    shard = copy / weight_map[name]
    tensors = load_file(shard)
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, shard, metadata={"format": "pt"})
    server = ServerProcess(copy)
    try:
        assert server.wait_exit() == 2
        log = server.stderr()
        assert "CheckpointError" in log and shard.name in log and name in log and "--trust-checkpoint" in log
    finally:
        server.stop()
    trusted = ServerProcess(copy, args=["--trust-checkpoint"]).wait_ready()  # the documented escape hatch
    trusted.stop()


def test_config_with_a_layer_less_refuses_to_start(converted, tmp_path):
    copy = _edited_copy(converted[0], tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config["num_hidden_layers"] -= 1
    (copy / "config.json").write_text(json.dumps(config))
    server = ServerProcess(copy)
    try:
        assert server.wait_exit() == 2
        log = server.stderr()
        assert "CheckpointError" in log and "config.json does not match" in log and "model.layers.1." in log
    finally:
        server.stop()


def test_generate_reads_the_prompt_from_stdin(converted, pair, monkeypatch, capsys):
    out, key = converted
    monkeypatch.setattr("sys.stdin", io.StringIO("w5 w6 w7\n"))
    endpoints = [p.endpoint for p in pair]
    argv = ["generate", str(out), "--prompt-file", "-", "--key", str(key), "--max-new-tokens", "3"]
    assert main([*argv, "--endpoints", *endpoints]) == 0
    assert capsys.readouterr().out.strip()


def test_a_restarted_server_is_waited_for_and_used_at_once(converted, pair):
    out, key = converted
    inputs = {"input_ids": torch.tensor([[4, 5, 6, 7]])}
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with HSSEEForCausalLM.from_pretrained(out, key=key, endpoints=[p.endpoint for p in pair]) as model:
        reference = model.generate(**inputs, **kwargs)
        b = pair[1]
        b.stop()  # SIGTERM, as an orchestrator restarting it would
        pair[1] = restarted = ServerProcess(out, port=b.port)
        result: dict = {}

        def run() -> None:
            try:
                result["tokens"] = model.generate(**inputs, **kwargs)
            except Exception as err:  # reported below
                result["error"] = err
            result["end"] = time.monotonic()

        thread = threading.Thread(target=run)
        thread.start()
        restarted.wait_ready()
        ready = time.monotonic()
        thread.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert torch.equal(result["tokens"], reference)
    assert result["end"] - ready < 3.0, f"the restarted server was used {result['end'] - ready:.1f} s after it was up"
