"""The native ring kernel (`ring_kernel.c`): exact against the int64 reference, and a clean fallback.

`test_ring.py` proves every kernel against a big-integer reference on small random problems; this file covers what only
the native kernel has: its SIMD blocks (four output rows with VNNI, two with AVX2) and their tails, the split of output
rows over threads, non-contiguous inputs, the 2-byte weight it reads, and what happens when no compiler is there. Every
path compiled into `ring_kernel.c` (AVX-512 VNNI, AVX2, scalar) is built explicitly where this CPU can run it and
checked on odd shapes and extreme values.
"""

from __future__ import annotations

import logging
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from hss_ee_hf.cli.demo import local_servers
from hss_ee_hf.cli.main import main as cli_main
from hss_ee_hf.errors import InvalidConfigError, NativeKernelError
from hss_ee_hf.ring import native
from hss_ee_hf.ring.csprng import ChaChaStream
from hss_ee_hf.ring.matmul import RingWeight, ring_matmul_reference
from hss_ee_hf.ring.sharing import share
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.transport.grpc_client import GrpcTransport

pytestmark = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler to build the native kernel"
)

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
W_MAX = (1 << 15) - 1


def extreme_problem(rows: int, in_features: int, out_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform shares and weights, with rows and columns pinned at the ends of both ranges."""
    rng = ChaChaStream(seed.to_bytes(4, "little") * 8)
    x = rng.int64((rows, in_features))
    x[0] = INT64_MIN
    if rows > 1:
        x[1] = INT64_MAX
    if rows > 2:
        x[2] = -1
    w = torch.remainder(rng.int64((out_features, in_features)), 2 * W_MAX + 1) - W_MAX
    w[0] = W_MAX
    if out_features > 1:
        w[1] = -W_MAX
    if out_features > 2:
        w[2, ::2] = -W_MAX
    return x, w


@pytest.mark.parametrize(
    "rows,in_features,out_features",
    [
        (1, 1, 1),
        (1, 3, 5),  # no full SIMD vector, no full four-row block
        (2, 4, 4),
        (3, 5, 7),  # one block and a tail on both axes
        (17, 1537, 9),
        (1, 576, 3072),  # enough work to split over threads
        (5, 1536, 577),  # threads, each with a tail of output rows
        (300, 64, 130),
    ],
)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_matches_int64_reference(rows, in_features, out_features, threads):
    x, w = extreme_problem(rows, in_features, out_features, seed=rows + in_features + out_features)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weight = RingWeight(w, kernel="native")
        y = weight.matmul(x)
    finally:
        torch.set_num_threads(before)
    assert weight.kernel == "native"
    assert torch.equal(y, ring_matmul_reference(x, w))


def test_native_reads_two_bytes_per_weight_and_takes_views():
    x, w = extreme_problem(6, 40, 12, seed=1)
    native_weight = RingWeight(w, kernel="native")
    float_weight = RingWeight(w, kernel="float64")
    assert native_weight.nbytes == 2 * w.numel()
    assert float_weight.nbytes == 8 * w.numel()
    view = x.T.contiguous().T  # same values, column-major strides
    assert not view.is_contiguous()
    assert torch.equal(native_weight.matmul(view), ring_matmul_reference(x, w))
    assert torch.equal(native_weight.matmul(x[:0]), torch.empty(0, 12, dtype=torch.int64))


def test_concurrent_calls_share_one_weight():
    # a server answers several sessions at once with the same weight: the kernel keeps no state
    x_all, w = extreme_problem(16, 320, 3072, seed=2)
    weight = RingWeight(w, kernel="native")
    results: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        results[i] = weight.matmul(x_all[i : i + 1])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(torch.cat([results[i] for i in range(16)]), ring_matmul_reference(x_all, w))


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
    """An empty build cache and no kernel loaded yet in this process."""
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("HSS_EE_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.delenv("HSS_EE_KERNEL", raising=False)
    return tmp_path / "kernels"


def test_build_is_cached_per_machine(fresh_kernel_state):
    kernel = native.load_native_kernel("native")
    assert kernel is not None and kernel.simd == ("avx2" in native._cpu_signature())
    built = list(fresh_kernel_state.glob("ring_kernel-*.so"))
    assert len(built) == 1 and kernel.path == built[0]
    native._loaded.clear()
    assert native.load_native_kernel("auto").path == built[0]  # reused, not rebuilt
    assert list(fresh_kernel_state.iterdir()) == built  # no temporary left behind


def test_without_a_compiler_auto_falls_back_and_native_says_why(fresh_kernel_state, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(fresh_kernel_state / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="hss_ee_hf.ring.native"):
        assert native.load_native_kernel("auto") is None
    assert "using the float64 kernel" in caplog.text
    with pytest.raises(NativeKernelError, match="unavailable"):
        native.load_native_kernel("native")
    x, w = extreme_problem(3, 33, 10, seed=3)
    weight = RingWeight(w)
    assert weight.kernel == "float64"
    assert torch.equal(weight.matmul(x), ring_matmul_reference(x, w))


def test_failed_compile_is_reported(fresh_kernel_state, monkeypatch, tmp_path):
    fake_cc = tmp_path / "fake-cc"
    fake_cc.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\necho 'boom: no' >&2\nexit 1\n")
    fake_cc.chmod(0o755)
    monkeypatch.setenv("CC", str(fake_cc))
    with pytest.raises(NativeKernelError, match="boom: no"):
        native.load_native_kernel("native")
    assert not list(fresh_kernel_state.glob("*.so"))


def test_kernel_choice_from_argument_and_environment(monkeypatch):
    monkeypatch.setenv("HSS_EE_KERNEL", "float64")
    assert native.kernel_choice() == "float64"
    assert native.load_native_kernel() is None
    assert RingWeight(torch.ones(2, 3, dtype=torch.int64)).kernel == "float64"
    assert native.kernel_choice("native") == "native"
    with pytest.raises(InvalidConfigError, match="auto, native, float64"):
        native.kernel_choice("fast")


def test_engines_with_either_kernel_return_the_same_bytes(tiny_ee_checkpoint):
    native_engine = StageEngine(tiny_ee_checkpoint, kernel="native")
    float_engine = StageEngine(tiny_ee_checkpoint, kernel="float64")
    assert (native_engine.kernel, float_engine.kernel) == ("native", "float64")
    rng = ChaChaStream(b"\x05" * 32)
    for stage, (in_features, _) in native_engine.describe().items():
        share = rng.bytes(3 * in_features * 8)
        fp = native_engine.fingerprint
        assert native_engine.compute(fp, stage, 3, share=share) == float_engine.compute(fp, stage, 3, share=share)


@pytest.mark.parametrize("kernel", ["native", "float64"])
def test_hss_ee_serve_takes_the_kernel_flag(tiny_ee_checkpoint, kernel):
    """`hss-ee serve --kernel` as a real process: the served products are the engine's, whichever kernel."""
    engine = StageEngine(tiny_ee_checkpoint, kernel="float64")
    in_features, out_features = engine.describe()["layers.0.qkv"]
    x = extreme_problem(3, in_features, 1, seed=4)[0]
    with local_servers(tiny_ee_checkpoint, extra_args=["--kernel", kernel, "--threads", "1"]) as endpoints:
        with GrpcTransport(endpoints) as transport:
            y_a, y_b = transport.run_stage(engine.fingerprint, "layers.0.qkv", share(x), out_features)
    expected = engine.compute(engine.fingerprint, "layers.0.qkv", 3, share=x.numpy().tobytes())
    assert (y_a + y_b).numpy().tobytes() == expected


def test_hss_ee_serve_refuses_an_unknown_kernel(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["serve", "ckpt", "--kernel", "fast"])
    assert info.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err


def test_an_unwritable_cache_falls_back_to_a_private_temporary_folder(fresh_kernel_state, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HSS_EE_KERNEL_CACHE", str(blocker / "kernels"))  # mkdir under a file fails
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(temp))
    kernel = native.load_native_kernel("native")
    private = temp / f"hss_ee_hf-kernels-{native.os.getuid()}"
    assert kernel.path.parent == private and private.stat().st_mode & 0o777 == 0o700

    native._loaded.clear()
    private.chmod(0o777)  # a folder others may write to: no code is loaded from it
    with pytest.raises(NativeKernelError, match="not a private folder"):
        native.load_native_kernel("native")


W_MIN = -(1 << 15)  # only the kernel itself takes it (RingWeight refuses |w| >= 2^15); u = 0


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def _expected_path(flags: set[str]) -> int:
    if {"avx512bw", "avx512_vnni"} <= flags:
        return 4
    return 1 if "avx2" in flags else 0


def _offset(w: torch.Tensor) -> torch.Tensor:
    """The kernel's 2-byte weight u = w + 2^15, as RingWeight holds it."""
    return (w.to(torch.int16) ^ W_MIN).contiguous()


@pytest.fixture(scope="module")
def kernel_builds(tmp_path_factory) -> dict[str, native.NativeRingKernel]:
    """The kernel built for each path this CPU can run: `-march=native`, AVX2 only (x86-64-v3), scalar (x86-64)."""
    folder = tmp_path_factory.mktemp("paths")
    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    flags = _cpu_flags()
    marches = {"native": "native"}
    if platform.machine() in ("x86_64", "AMD64"):
        marches["scalar"] = "x86-64"
        if {"avx2", "bmi2", "fma", "movbe"} <= flags:
            marches["avx2"] = "x86-64-v3"
    built = {}
    for name, march in marches.items():
        path = folder / f"ring_kernel-{name}.so"
        cmd = [cc, *[f for f in native._FLAGS if not f.startswith("-march")], f"-march={march}", str(native._SOURCE)]
        result = subprocess.run([*cmd, "-o", str(path)], capture_output=True, text=True)
        if result.returncode != 0 and name != "native":  # an older compiler without this -march level
            continue
        assert result.returncode == 0, result.stderr
        built[name] = native.NativeRingKernel(path)
    return built


def test_each_build_reports_its_simd_path(kernel_builds):
    assert native.SIMD_PATHS[kernel_builds["native"].simd_path]  # a known path
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        assert kernel_builds["native"].simd_path == _expected_path(_cpu_flags())
    if "scalar" in kernel_builds:
        assert kernel_builds["scalar"].simd_path == 0 and not kernel_builds["scalar"].simd
    if "avx2" in kernel_builds:
        assert kernel_builds["avx2"].simd_path == 1 and kernel_builds["avx2"].simd


def test_the_loaded_kernel_is_the_native_build(fresh_kernel_state):
    kernel = native.load_native_kernel("native")
    assert native.SIMD_PATHS[kernel.simd_path] in ("scalar", "avx2", "avx512vnni")
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        assert kernel.simd_path == _expected_path(_cpu_flags())


def _extreme(rows: int, in_features: int, out_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random shares and weights with every extreme value on every row and column pattern."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(INT64_MIN, INT64_MAX, (rows, in_features), generator=g)
    specials = torch.tensor([INT64_MIN, INT64_MAX, -1, 0, 1, INT64_MIN + 1, (1 << 32) - 1, -(1 << 32)])
    x[0] = specials[torch.arange(in_features) % len(specials)]
    if rows > 1:
        x[1] = INT64_MIN
    if rows > 2:
        x[2] = INT64_MAX
    if rows > 3:
        x[3] = -1
    w = torch.randint(W_MIN, -W_MIN, (out_features, in_features), generator=g)
    w[0] = torch.tensor([W_MAX, -W_MAX, W_MIN])[torch.arange(in_features) % 3]
    if out_features > 1:
        w[1] = W_MIN
    if out_features > 2:
        w[2] = W_MAX
    if out_features > 3:
        w[3] = -W_MAX
    return x, w


@pytest.mark.parametrize("path", ["native", "avx2", "scalar"])
@pytest.mark.parametrize("in_features", [0, 1, 7, 8, 9, 15, 17, 31, 32, 33, 992, 993, 4097])
def test_every_path_on_odd_shapes_and_extreme_values(kernel_builds, path, in_features):
    if path not in kernel_builds:
        pytest.skip(f"this CPU cannot run the {path} build")
    kernel = kernel_builds[path]
    for rows in (1, 2, 3, 5, 17):
        x, w = _extreme(rows, in_features, 9, seed=rows * 10_000 + in_features)
        for out_features in range(1, 10):
            wo = w[:out_features].contiguous()
            y = kernel.matmul(x, _offset(wo))
            assert torch.equal(y, x @ wo.T), (path, rows, in_features, out_features)


@pytest.mark.parametrize("path", ["native", "avx2", "scalar"])
def test_every_path_at_the_lane_bound(kernel_builds, path):
    """The digit paths' worst case: every low digit at its most negative (-2^10, -2^10, -2^9) against w = -2^15 (and
    +2^15-1) over several chunks (992 inputs with VNNI, 496 with AVX2), so each 32-bit lane reaches 31 * 2^26 before
    it is widened. A build with 32 steps per chunk fails this test on both paths."""
    if path not in kernel_builds:
        pytest.skip(f"this CPU cannot run the {path} build")
    lane_max = -(1 << 10) - (1 << 21) - (1 << 31)  # digits d0 = d1 = -2^10, d2 = -2^9, d3 = d4 = -1
    for in_features in (992, 993, 1024, 4097):
        x = torch.full((3, in_features), lane_max)
        x[1] = INT64_MIN
        x[2, ::2] = INT64_MAX
        w = torch.full((6, in_features), W_MIN)
        w[1] = W_MAX
        w[2, ::2] = W_MAX
        w[3] = -W_MAX
        w[4, 1::2] = W_MAX
        assert torch.equal(kernel_builds[path].matmul(x, _offset(w)), x @ w.T), (path, in_features)
