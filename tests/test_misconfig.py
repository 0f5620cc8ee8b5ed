"""Safe against misconfiguration (issue 19): typed, actionable refusals instead of silent damage or tracebacks.

Rows exercised here without share-server processes (those are in `test_misconfig_servers.py`): `convert --force`
never deletes what it did not write, damaged or edited files are named, out-of-range flags are usage errors,
`hss-ee --help` is quick, concurrent loading is safe, a world-readable key warns, and a large request gives its
memory back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_models import convert_tiny, save_tiny

from hss_ee_hf import EEKey, HSSEEForCausalLM
from hss_ee_hf.cli.main import build_parser, main
from hss_ee_hf.errors import CheckpointError, InvalidConfigError
from hss_ee_hf.server import engine as engine_module
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.options import resolve_device
from hss_ee_hf.transport.inprocess import InProcessTransport

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("misconfig")
    _, out, key = convert_tiny("llama", root)
    return root / "llama-src", out, key


@pytest.fixture(scope="module")
def engine(converted) -> StageEngine:
    return StageEngine(converted[1])


# --- row 2: --force replaces only what the converter wrote ---------------------------------------------------


def test_force_never_deletes_the_source_inside_out(tmp_path, capsys):
    work = tmp_path / "work"
    save_tiny("llama", work / "src")
    code = main(["convert", str(work / "src"), str(work), "--key", str(tmp_path / "k"), "--force"])
    err = capsys.readouterr().err
    assert code == 2 and "ConversionError" in err and "overlap" in err
    assert (work / "src" / "config.json").exists() and (work / "src" / "model.safetensors").exists()


def test_force_refuses_an_out_that_is_not_an_ee_checkpoint(converted, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    code = main(["convert", str(converted[0]), str(out), "--key", str(tmp_path / "k"), "--force"])
    err = capsys.readouterr().err
    assert code == 2 and "not one" in err and "hss_ee" in err
    assert (out / "holiday.jpg").read_bytes() == b"\xff\xd8"


def test_force_replaces_an_ee_checkpoint(converted, tmp_path):
    out = tmp_path / "ee"
    shutil.copytree(converted[1], out)
    assert main(["convert", str(converted[0]), str(out), "--key", str(tmp_path / "k"), "--force"]) == 0


# --- row 7: damaged or edited files are named ----------------------------------------------------------------


def _copy(converted, tmp_path: Path) -> Path:
    return Path(shutil.copytree(converted[1], tmp_path / "copy"))


def _server_shard(folder: Path) -> Path:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder / weight_map["model.layers.0.mlp.down_proj.weight"]


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_server_names_a_truncated_or_missing_shard(converted, tmp_path, damage):
    folder = _copy(converted, tmp_path)
    shard = _server_shard(folder)
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        StageEngine(folder)


@pytest.mark.parametrize("edit", ["invalid-json", "hidden_size", "vocab_size", "client-shard-truncated"])
def test_client_names_a_damaged_or_edited_file(converted, engine, tmp_path, edit):
    folder = _copy(converted, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    if edit == "invalid-json":
        (folder / "config.json").write_text("{not json")
    elif edit == "client-shard-truncated":
        shard = folder / "model-client.safetensors"
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        config[edit] += 8
        (folder / "config.json").write_text(json.dumps(config))
    expected = "model-client.safetensors" if edit == "client-shard-truncated" else "config.json"
    with pytest.raises(CheckpointError, match=expected):
        HSSEEForCausalLM.from_pretrained(folder, key=converted[2], transport=InProcessTransport(engine))


def test_truncated_source_model_is_named(converted, tmp_path, capsys):
    src = Path(shutil.copytree(converted[0], tmp_path / "src"))
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code = main(["convert", str(src), str(tmp_path / "ee"), "--key", str(tmp_path / "k")])
    err = capsys.readouterr().err
    assert code == 2 and "ConversionError" in err and str(weights) in err and "Traceback" not in err


def test_read_only_out_parent_is_named(converted, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: let the permission check see what another user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == parent else real_access(p, mode))
    try:
        code = main(["convert", str(converted[0]), str(parent / "ee"), "--key", str(tmp_path / "k")])
    finally:
        parent.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2 and "ConversionError" in err and str(parent) in err


# --- row 8: out-of-range flags and values --------------------------------------------------------------------

SERVE = ["serve", "ckpt"]
GENERATE = ["generate", "ckpt", "hi", "--key", "k", "--endpoints", "127.0.0.1:1", "127.0.0.1:2"]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (SERVE + ["--port", "70000"], "--port"),
        (SERVE + ["--port", "-1"], "--port"),
        (SERVE + ["--max-rows", "0"], "--max-rows"),
        (SERVE + ["--max-rows", "-5"], "--max-rows"),
        (SERVE + ["--batch-window-ms", "-1"], "--batch-window-ms"),
        (SERVE + ["--workers", "0"], "--workers"),
        (GENERATE[:5] + ["--endpoints", "127.0.0.1:1", "127.0.0.1:99999"], "--endpoints"),
        (GENERATE[:5] + ["--endpoints", "hostA", "127.0.0.1:2"], "--endpoints"),
        (GENERATE + ["--timeout", "0"], "--timeout"),
        (GENERATE + ["--max-new-tokens", "0"], "--max-new-tokens"),
        (GENERATE + ["--do-sample", "--temperature", "0"], "--temperature"),
        (GENERATE + ["--retries", "-1"], "--retries"),
    ],
)
def test_out_of_range_flags_are_usage_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {flag}" in err
    assert any(word in err for word in ("must be", "no port", "expected")), err


def test_empty_prompt_is_refused(tmp_path, capsys):
    prompt = tmp_path / "empty.txt"
    prompt.write_text("  \n")
    argv = ["generate", "ckpt", "--prompt-file", str(prompt), "--key", "k", "--endpoints", "a:1", "b:2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "InvalidConfigError" in err and "prompt" in err and "is empty" in err


@pytest.mark.parametrize("endpoints", ["ab", ("127.0.0.1",) * 2, ("127.0.0.1:1", "127.0.0.1:0")])
def test_bad_endpoints_are_refused_by_the_api(converted, endpoints):
    with pytest.raises(InvalidConfigError, match="host:port|port"):
        HSSEEForCausalLM.from_pretrained(converted[1], key=converted[2], endpoints=endpoints)


@pytest.mark.parametrize(("option", "value"), [("max_rows", 0), ("max_rows", -5), ("batch_window_ms", -1.0)])
def test_engine_options_are_checked(converted, option, value):
    with pytest.raises(InvalidConfigError, match=option):
        StageEngine(converted[1], **{option: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(InvalidConfigError, match="--device cuda asks for a GPU"):
        resolve_device("cuda")


# --- row 9: quick --help and --version -----------------------------------------------------------------------


def test_help_and_version_are_quick_and_match_the_full_parser(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    script = Path(sys.executable).parent / "hss-ee"
    env = {**os.environ, "COLUMNS": "200"}
    start = time.perf_counter()
    quick = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env, check=True)
    elapsed = time.perf_counter() - start
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert quick.stdout == capsys.readouterr().out  # the launcher's help is the full parser's
    assert elapsed < 1.0, f"hss-ee --help took {elapsed:.2f} s"
    import hss_ee_hf

    assert version.stdout.strip() == f"hss-ee {hss_ee_hf.__version__}"


# --- row 5: concurrent loading ---------------------------------------------------------------------------------


def test_sixteen_threads_load_at_once(converted, engine):
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def load() -> None:
        barrier.wait()
        try:
            HSSEEForCausalLM.from_pretrained(converted[1], key=converted[2], transport=InProcessTransport(engine))
        except BaseException as err:  # collected and reported below
            errors.append(err)

    threads = [threading.Thread(target=load) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# --- row 11: a key file others can read ------------------------------------------------------------------------


def test_world_readable_key_warns(converted, tmp_path, caplog):
    key = Path(shutil.copy(converted[2], tmp_path / "k"))
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="hss_ee_hf"):
        EEKey.load(key)
    assert "readable by other users" in caplog.text and "chmod 600" in caplog.text
    caplog.clear()
    key.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="hss_ee_hf"):
        EEKey.load(key)
    assert "readable" not in caplog.text


# --- row 10: memory after a long prompt ------------------------------------------------------------------------


def test_large_requests_give_memory_back(engine, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(engine_module, "release_after_large_request", lambda: calls.append(1))
    stage, (in_features, _) = next(iter(engine.describe().items()))
    for rows in (1, engine_module.TRIM_ROWS):
        engine.compute(engine.fingerprint, stage, rows, share=bytes(rows * in_features * 8))
    assert calls == [1]  # only the large request paid for a trim
    from hss_ee_hf.server.memory import release_freed_memory

    assert release_freed_memory() is sys.platform.startswith("linux")


def test_memory_goes_back_once_large_requests_stop(monkeypatch):
    """A burst of large requests (a prompt's stages, an image's convolutions) reuses freed memory; one trim follows
    the last of them, `TRIM_IDLE_SECONDS` later, and none runs while they keep coming."""
    from hss_ee_hf.server import memory

    trims: list[float] = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: trims.append(time.monotonic()))
    monkeypatch.setattr(memory, "TRIM_IDLE_SECONDS", 0.5)
    start = time.monotonic()
    for _ in range(6):  # requests much closer together than the quiet time
        last = time.monotonic()
        memory.release_after_large_request()
        time.sleep(0.02)
    assert trims == []
    deadline = time.monotonic() + 5.0
    while not trims and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.6)  # no second trim follows
    assert len(trims) == 1 and trims[0] >= last + 0.5 - 0.01 and trims[0] - start >= 0.5
    assert memory.keep_freed_memory() is sys.platform.startswith("linux")


# --- row 1 (unit level; the real-process cases are in test_misconfig_servers.py) ---------------------------------


def test_an_address_in_both_pools_or_one_operator_is_refused():
    from hss_ee_hf.errors import PartyOverlapError
    from hss_ee_hf.transport.endpoints import check_distinct_addresses, check_distinct_parties

    check_distinct_addresses([["127.0.0.1:5001", "127.0.0.1:5002"], ["127.0.0.1:5003"]])
    with pytest.raises(PartyOverlapError, match="same address 127.0.0.1:5002"):
        check_distinct_addresses([["127.0.0.1:5001", "127.0.0.1:5002"], ["127.0.0.1:5003", "localhost:5002"]])
    a = {"endpoint": "a:1", "instance_id": "1" * 32, "operator": "acme"}
    check_distinct_parties([a, {"endpoint": "b:1", "instance_id": "2" * 32, "operator": "other"}])
    with pytest.raises(PartyOverlapError, match="operator 'acme'"):
        check_distinct_parties([a, {"endpoint": "b:1", "instance_id": "2" * 32, "operator": "acme"}])
