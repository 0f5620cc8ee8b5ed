"""The `hss-ee` command line: help texts and `hss-ee convert` (in-process and as a real subprocess)."""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny

from hss_ee_hf import EEKey, HSSEECheckpointInfo
from hss_ee_hf.cli.main import build_parser, main

SUBCOMMANDS = ("convert", "serve", "generate", "classify", "push", "demo", "gateway", "certs")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0, f"{argv} exited with {exit_info.value.code}"
    captured = capsys.readouterr()
    return captured.out


def printed_fingerprint(stdout: str) -> str:
    match = re.search(r"fingerprint:\s+([0-9a-f]{64})\b", stdout)
    assert match, f"no fingerprint in the output:\n{stdout}"
    return match.group(1)


@pytest.fixture(autouse=True)
def wide_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def test_subcommands_are_the_documented_ones():
    assert tuple(subparsers(build_parser())) == SUBCOMMANDS


def test_top_level_help_mentions_every_flag_and_subcommand(capsys):
    parser = build_parser()
    text = help_text(["--help"], capsys)
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text, f"`hss-ee --help` does not mention {option}"
    for name in SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\s+\S", text, re.MULTILINE), f"`hss-ee --help` does not describe {name}"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_mentions_every_flag(command, capsys):
    sub = subparsers(build_parser())[command]
    text = help_text([command, "--help"], capsys)
    options = [o for a in sub._actions for o in a.option_strings]
    assert "--help" in options and len(options) > 2
    for action in sub._actions:
        for option in action.option_strings:
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), f"{command} --help lacks {option}"
        if not action.option_strings:  # positionals are listed by name, with their help
            assert action.help and re.search(rf"^\s+{action.dest}\s+\S", text, re.MULTILINE), action.dest


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: hss-ee" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("cli") / "llama-src"
    save_tiny("llama", src)
    return src


def test_convert_force_and_refusal(tiny_src, tmp_path, capsys):
    out, key = tmp_path / "ee", tmp_path / "k.hss-ee-key"
    assert main(["convert", str(tiny_src), str(out), "--key", str(key)]) == 0
    first = printed_fingerprint(capsys.readouterr().out)
    assert HSSEECheckpointInfo.from_folder(out).fingerprint == first
    assert EEKey.load(key).fingerprint == first
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    config_before = (out / "config.json").read_bytes()

    # a second run without --force is refused with a typed, actionable message
    code = main(["convert", str(tiny_src), str(out), "--key", str(key)])
    captured = capsys.readouterr()
    assert code != 0
    assert "ConversionError" in captured.err and "already exists" in captured.err and "--force" in captured.err
    assert "Traceback" not in captured.err and "fingerprint:" not in captured.out
    assert (out / "config.json").read_bytes() == config_before
    assert EEKey.load(key).fingerprint == first

    # --force converts again (new transforms) and records the ring flags
    assert main(["convert", str(tiny_src), str(out), "--key", str(key), "--force", "--frac-bits", "12"]) == 0
    second = printed_fingerprint(capsys.readouterr().out)
    assert second != first
    assert EEKey.load(key).fingerprint == second == HSSEECheckpointInfo.from_folder(out).fingerprint
    ring = json.loads((out / "config.json").read_text(encoding="utf-8"))["hss_ee"]["ring"]
    assert ring == {"frac_bits": 12, "weight_bits": 16}


def test_convert_missing_source_is_a_message_not_a_traceback(tmp_path, capsys):
    src = tmp_path / "no-such-model"
    code = main(["convert", str(src), str(tmp_path / "ee"), "--key", str(tmp_path / "k.hss-ee-key")])
    captured = capsys.readouterr()
    assert code != 0
    assert "hss-ee convert: error: ConversionError" in captured.err and str(src) in captured.err
    assert "Traceback" not in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_convert_bad_ring_flag_is_a_message_not_a_traceback(tiny_src, tmp_path, capsys):
    code = main(["convert", str(tiny_src), str(tmp_path / "ee"), "--key", str(tmp_path / "k"), "--frac-bits", "30"])
    assert code != 0
    assert "frac_bits" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_convert_as_a_subprocess(tiny_src, tmp_path):
    out, key = tmp_path / "ee", tmp_path / "k.hss-ee-key"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "hss_ee_hf.cli.main", "convert", str(tiny_src), str(out), "--key", str(key)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    fingerprint = printed_fingerprint(proc.stdout)
    assert HSSEECheckpointInfo.from_folder(out).fingerprint == fingerprint == EEKey.load(key).fingerprint
    assert "equivariance:" in proc.stdout
