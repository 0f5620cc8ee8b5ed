"""The native ring kernel: `ring_kernel.c`, compiled once per machine and called through ctypes.

Decode is memory-bound: a server reads every weight once per token. The float64 kernel of
[`RingWeight`] reads 8 bytes per weight; the native one reads the 16-bit integer itself (2 bytes).
Prefill (many rows) is compute-bound. The C file holds three paths, chosen when it is compiled for
this CPU (`-march=native`) and reported by `hss_ee_kernel_simd()` as [`NativeRingKernel.simd_path`]:

* `4` (`"avx512vnni"`, AVX512BW + AVX512VNNI): x is rewritten once per call as five signed 16-bit
  digits, `x = d0 + 2^11 d1 + 2^22 d2 + 2^32 d3 + 2^48 d4 mod 2^64`, and `vpdpwssd` multiplies 32 digits
  by 32 weights (read as int16, `u ^ 0x8000`) per instruction into 32-bit lanes. The two high digits
  only matter mod 2^32, which the wrapping lanes keep; the three low digits (at most 11 bits) cannot
  overflow a lane within 992 inputs, after which the lanes are widened to 64 bits. Exact mod 2^64.
* `1` (`"avx2"`): the same five digits, with `vpmaddwd` (16 digits by 16 weights into 8 lanes) and `vpaddd`;
  AVX2 has half VNNI's lanes and no fused add, so a chunk is 496 inputs. Exact mod 2^64.
* `0` (`"scalar"`): `x*w = x*u - 2^15 x mod 2^64` with the offset weight `u = w + 2^15`, in plain 64-bit C
  arithmetic.

The comment atop `ring_kernel.c` has the full exactness argument. It is built the first time a server
needs it with the system C compiler (`cc -O3 -march=native`), cached under `~/.cache/hss_ee_hf/kernels`
(or `$HSS_EE_KERNEL_CACHE`) by a hash of the source, the compiler and the CPU, and loaded with ctypes,
which releases the GIL while it runs. Without a compiler the servers keep the float64 kernel.

Set `HSS_EE_KERNEL=float64` to keep the float64 kernel, or `HSS_EE_KERNEL=native` to make a failed
build an error instead of a fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ..errors import InvalidConfigError, NativeKernelError

logger = logging.getLogger(__name__)

KERNEL_CHOICES = ("auto", "native", "float64", "int8")  # int8: [`hss_ee_hf.ring.int8`]
_SOURCE = Path(__file__).with_name("ring_kernel.c")
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread"]
# Below this many multiply-adds a second thread costs more to start than it saves.
_THREAD_MIN_MACS = 1 << 20
# What `hss_ee_kernel_simd()` returns: the path compiled into the kernel.
SIMD_PATHS = {0: "scalar", 1: "avx2", 4: "avx512vnni"}
_lock = threading.Lock()
_loaded: dict[str, object] = {}
_limits = threading.local()  # per calling thread: the most kernel threads its products may use


def limit_threads(threads: int | None) -> None:
    """Caps the kernel threads of products computed on the calling thread (`None` lifts the cap).

    The data plane caps a connection from this machine at one: the client (and often the other server) share
    the cores, and a product split over busy cores waits for its slowest half.
    """
    _limits.threads = threads


def kernel_choice(kernel: str | None = None) -> str:
    """The kernel asked for: the argument, else `$HSS_EE_KERNEL`, else `"auto"`."""
    choice = kernel or os.environ.get("HSS_EE_KERNEL") or "auto"
    if choice not in KERNEL_CHOICES:
        raise InvalidConfigError(f"kernel must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")
    return choice


def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU's model and flags (Linux), else the platform string."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.platform() + platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))  # first CPU's lines, once


def _cache_dir() -> Path:
    if os.environ.get("HSS_EE_KERNEL_CACHE"):
        return Path(os.environ["HSS_EE_KERNEL_CACHE"])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "hss_ee_hf" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build() -> Path:
    cc = _compiler()
    if cc is None:
        raise NativeKernelError("no C compiler found (set CC or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + version.encode() + " ".join(_FLAGS).encode() + _cpu_signature().encode())
    name = f"ring_kernel-{digest.hexdigest()[:16]}.so"
    try:
        target = _cache_dir() / name
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError) as err:  # a read-only or unknown home: a private per-user temporary folder
        folder = Path(tempfile.gettempdir()) / f"hss_ee_hf-kernels-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:  # someone else's folder: never load code from it
            raise NativeKernelError(f"{folder} is not a private folder of this user; set HSS_EE_KERNEL_CACHE") from err
        target = folder / name
        if target.exists():
            return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", str(built)], capture_output=True, text=True)
        if result.returncode != 0:
            raise NativeKernelError(f"{cc} failed to build {_SOURCE.name}:\n{result.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent build of the same kernel ends with one good file
    logger.info("built the native ring kernel %s", target)
    return target


class NativeRingKernel:
    """The loaded shared library: `matmul(x, u)` with `u` the offset 16-bit weight.

    `simd_path` is the compiled path (a key of `SIMD_PATHS`); `simd` is whether it is any SIMD path.
    """

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        self.path = path
        self.simd_path = int(lib.hss_ee_kernel_simd())  # a key of SIMD_PATHS
        self.simd = self.simd_path != 0
        self._fn = lib.hss_ee_ring_matmul
        self._fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        self._fn.restype = ctypes.c_int

    def matmul(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Exact `x @ (u - 2^15).T mod 2^64` for an `(n, in)` int64 `x` and an `(out, in)` 16-bit `u`."""
        x = x.contiguous()
        n, in_features = x.shape
        out_features = u.shape[0]
        y = torch.empty(n, out_features, dtype=torch.int64)
        if n == 0:
            return y
        macs = n * in_features * out_features
        threads = torch.get_num_threads() if macs >= _THREAD_MIN_MACS else 1
        cap = getattr(_limits, "threads", None)
        if cap is not None:
            threads = max(1, min(threads, cap))
        pointers = (x.data_ptr(), u.data_ptr(), y.data_ptr())
        rc = self._fn(*pointers, n, in_features, out_features, threads)
        if rc != 0:
            raise MemoryError(f"the native ring kernel could not allocate its per-call buffers for {n} rows")
        return y


def load_native_kernel(kernel: str | None = None) -> NativeRingKernel | None:
    """Builds (once per machine) and loads the native kernel, or returns `None` to use float64.

    Args:
        kernel (`str`, *optional*): `"auto"` (native when it builds, else float64), `"native"` (a failed
            build raises), `"float64"` or `"int8"` (returns `None`). Defaults to `$HSS_EE_KERNEL` or `"auto"`.

    Raises:
        `NativeKernelError`: `kernel="native"` and the kernel could not be built or loaded.
    """
    choice = kernel_choice(kernel)
    if choice in ("float64", "int8"):
        return None
    with _lock:
        if "kernel" not in _loaded:
            try:
                _loaded["kernel"] = NativeRingKernel(_build())
            except (NativeKernelError, OSError) as err:
                _loaded["kernel"] = err
                logger.warning("native ring kernel unavailable (%s); using the float64 kernel", err)
        found = _loaded["kernel"]
    if isinstance(found, NativeRingKernel):
        return found
    if choice == "native":
        raise NativeKernelError(f"the native ring kernel was asked for but is unavailable: {found}")
    return None
