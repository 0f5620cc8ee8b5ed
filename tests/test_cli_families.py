"""`hss-ee convert`, `serve`'s engine, `generate` and `classify` on T5 and image classifiers, end to end.

Converts tiny T5 and ResNet models with the CLI, serves them with two real gRPC share servers on loopback, and
checks what `hss-ee generate` (T5) and `hss-ee classify` print against the plaintext models.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_families import IMAGE_SIZE, tiny_family_model, tiny_image_processor
from tiny_models import tiny_tokenizer
from transformers import pipeline

from hss_ee_hf.cli.main import main
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.grpc_server import start_server

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _convert(variant: str, root: Path) -> tuple[torch.nn.Module, Path, Path]:
    src, out, key = root / f"{variant}-src", root / f"{variant}-ee", root / f"{variant}.key"
    model = tiny_family_model(variant)
    model.save_pretrained(src)
    if variant.startswith("t5"):
        tiny_tokenizer().save_pretrained(src)
    else:
        tiny_image_processor(variant).save_pretrained(src)
    assert main(["convert", str(src), str(out), "--key", str(key)]) == 0
    return model, out, key


@pytest.fixture
def servers(request: pytest.FixtureRequest) -> Iterator:
    started = []

    def start(folder: Path) -> list[str]:
        for _ in range(2):
            started.append(start_server(StageEngine(folder), "127.0.0.1", 0))
        return [f"127.0.0.1:{port}" for _, port in started[-2:]]

    yield start
    for server, _ in started:
        server.stop(grace=None)


def test_generate_runs_t5(tmp_path: Path, servers, capsys: pytest.CaptureFixture) -> None:
    plain, folder, key = _convert("t5-relu-tied", tmp_path)
    endpoints = servers(folder)
    prompt = "w5 w6 w7 w8 w9"
    capsys.readouterr()
    code = main(
        ["generate", str(folder), prompt, "--key", str(key), "--endpoints", *endpoints, "--max-new-tokens", "8"]
    )
    assert code == 0
    tok = tiny_tokenizer()
    with torch.no_grad():
        expected = plain.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=8)
    text = tok.decode(expected[0], skip_special_tokens=True)
    assert text and capsys.readouterr().out.strip() == text.strip()


def test_classify_prints_the_plaintext_top_labels(tmp_path: Path, servers, capsys: pytest.CaptureFixture) -> None:
    variant = "resnet-bottleneck"
    plain, folder, key = _convert(variant, tmp_path)
    endpoints = servers(folder)
    rng = np.random.default_rng(3)  # test images, not masks
    paths = []
    for i in range(2):
        size = IMAGE_SIZE[variant]
        path = tmp_path / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    capsys.readouterr()
    assert main(["classify", str(folder), *paths, "--key", str(key), "--endpoints", *endpoints, "--top-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    expected = pipeline("image-classification", model=plain, image_processor=tiny_image_processor(variant))(
        paths, top_k=2
    )
    lines = []
    for path, rows in zip(paths, expected, strict=True):
        lines.append(path)
        lines += [row["label"] for row in rows]
    assert [line.split()[-1] for line in out] == [line.split()[-1] for line in lines]


def test_classify_missing_image_is_a_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["classify", "ckpt", str(tmp_path / "nope.png"), "--key", "k", "--endpoints", "a:1", "b:2"])
    assert code == 2
    assert "InputFileError: image file(s) not found" in capsys.readouterr().err


def test_generate_refuses_an_image_classifier(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, folder, key = _convert("vit", tmp_path)
    code = main(["generate", str(folder), "w5", "--key", str(key), "--endpoints", "127.0.0.1:1", "127.0.0.1:2"])
    assert code == 2
    assert "use `hss-ee classify`" in capsys.readouterr().err
