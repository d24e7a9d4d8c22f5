"""Builds and loads CUDA kernel source as a CPU shared library through the harness (see README.md).

`load(name, sources)` compiles each source with g++ (``-x c++ -DLESS_HARNESS -include harness.h``; .cu files are
compiled as C++), links them with the harness runtime into one shared library and opens it with ctypes. Objects
and libraries are cached under build/harness/ (or $LESS_HARNESS_BUILD_DIR), keyed by a hash of the compiler, the
flags, the source and every header it can include, so a test run recompiles only what changed; sources compile in
parallel. No torch headers are involved, which keeps a full rebuild to a few seconds.

The floating-point mode follows nvcc's flags (csrc/cuda_build.py): with --use_fast_math there, the kernels are
built with -DLESS_HARNESS_FAST_MATH (approximate exp and log, subnormals flushed); `load(..., fast_math=True)` asks
for that mode whatever the flags, so that a test can show what fast math would change.

With LESS_CUDA_SANITIZE set (csrc/sanitize.py), the kernels and the runtime are built with ASan/UBSan; the process
must then have libasan loaded first (LD_PRELOAD), as `make test-sanitize` arranges.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "csrc"))
import cuda_build  # noqa: E402
import sanitize  # noqa: E402

TESTING = ROOT / "csrc" / "testing"
RUNTIME = TESTING / "harness_runtime.cpp"
CXX = os.environ.get("CXX", "g++")
FLAGS = [
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-fvisibility=hidden",
    "-DLESS_HARNESS",
    # Kernels reinterpret 16-byte vectors as __half2 / float lanes, as CUDA code does; nvcc allows it.
    "-fno-strict-aliasing",
    "-U_FORTIFY_SOURCE",
    "-Wall",
    "-Wno-unknown-pragmas",  # #pragma unroll
    "-include",
    str(TESTING / "harness.h"),
    "-I",
    str(TESTING / "shim"),
    "-I",
    str(ROOT / "csrc"),
    *sanitize.compile_flags(sanitize.requested()),
    # ASan then also guards a std::vector's spare capacity: dynamic shared memory is one, reused across launches.
    *(["-D_GLIBCXX_SANITIZE_VECTOR"] if "address" in sanitize.requested() else []),
]
LINK_FLAGS = sanitize.link_flags(sanitize.requested())


def _headers() -> list[Path]:
    """Every header a source may include: hashing them all is coarse but never stale."""
    patterns = ("csrc/*.h", "csrc/cuda/*.h", "csrc/cuda/*.cuh", "csrc/testing/*.h", "csrc/testing/shim/*.h")
    return sorted(p for pattern in patterns for p in ROOT.glob(pattern))


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:20]


def _cache_dir() -> Path:
    return Path(os.environ.get("LESS_HARNESS_BUILD_DIR", ROOT / "build" / "harness"))


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"harness build failed:\n{' '.join(cmd)}\n{done.stdout}{done.stderr}")


def _publish(build, target: Path) -> None:
    """Runs build(tmp_path) and moves the result into place atomically (concurrent test runs may race)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_path = Path(tmp) / target.name
        build(tmp_path)
        os.replace(tmp_path, target)


def _compile(source: Path, flags: list[str], env_key: bytes, headers_key: bytes) -> Path:
    obj = _cache_dir() / "obj" / f"{source.stem}-{_digest(env_key, headers_key, source.read_bytes())}.o"
    if not obj.exists():
        _publish(lambda out: _run([CXX, *flags, "-x", "c++", "-c", str(source), "-o", str(out)]), obj)
    return obj


_loaded: dict[str, ctypes.CDLL] = {}


def load(name: str, sources: list[Path], fast_math: bool = cuda_build.fast_math()) -> ctypes.CDLL:
    """The shared library built from `sources` plus the harness runtime, compiled if needed; `fast_math`: emulate
    nvcc's --use_fast_math (by default, exactly when the package's nvcc flags have it)."""
    name += "-fast-math" if fast_math else ""
    if name in _loaded:
        return _loaded[name]
    if shutil.which(CXX) is None:
        raise RuntimeError(f"the CUDA harness needs a C++ compiler ({CXX}) on PATH")
    flags = FLAGS + (["-DLESS_HARNESS_FAST_MATH"] if fast_math else [])
    version = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout.encode()
    env_key = _digest(version, " ".join(flags + LINK_FLAGS).encode()).encode()
    headers_key = _digest(*(p.read_bytes() for p in _headers())).encode()
    all_sources = [RUNTIME, *sources]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        objects = list(pool.map(lambda s: _compile(s, flags, env_key, headers_key), all_sources))
    lib_path = _cache_dir() / f"{name}-{_digest(*(str(o).encode() for o in objects))}.so"
    if not lib_path.exists():
        _publish(lambda out: _run([CXX, "-shared", *LINK_FLAGS, "-o", str(out), *map(str, objects)]), lib_path)
    lib = ctypes.CDLL(str(lib_path))
    lib.less_harness_last_error.restype = ctypes.c_char_p
    lib.less_harness_set_schedule.argtypes = [ctypes.c_int, ctypes.c_uint]
    lib.less_harness_set_occupancy.argtypes = [ctypes.c_int]
    _loaded[name] = lib
    return lib


def check(lib: ctypes.CDLL, code: int) -> None:
    """Raises with the harness's explanation when a launch returned an error."""
    if code != 0:
        raise RuntimeError(f"harness launch failed (cudaError {code}): {lib.less_harness_last_error().decode()}")


SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}


def set_schedule(lib: ctypes.CDLL, schedule: str, seed: int = 0) -> None:
    """Order in which threads and blocks are run: a correct kernel gives the same result under all of them."""
    lib.less_harness_set_schedule(SCHEDULES[schedule], seed)
