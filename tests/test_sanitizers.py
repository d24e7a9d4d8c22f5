"""The sanitizer build (LESS_CUDA_SANITIZE, csrc/sanitize.py) really instruments the code: ASan and UBSan report
bugs planted in harness kernel code, fibers' stacks included. `make test-sanitize` runs the op and harness tests
under that build; here the planted bugs show that a clean run there means something."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTING = ROOT / "csrc" / "testing"
SANITIZED = os.environ.get("LESS_CUDA_SANITIZE", "")


def libasan() -> str:
    path = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    assert os.path.isabs(path), "g++ has no libasan: the sanitizer build needs it"
    return path


@pytest.mark.parametrize(
    "kind, report",
    [
        (0, "heap-buffer-overflow"),
        (1, "runtime error: signed integer overflow"),
        (2, "stack-buffer-overflow"),
        # Dynamic shared memory is a std::vector reused across launches: past its end, or within its spare
        # capacity (annotated for ASan in this build).
        (3, "heap-buffer-overflow|container-overflow"),
    ],
)
def test_planted_kernel_bug_is_reported(kind, report):
    script = (
        f"import sys; sys.path.insert(0, {str(TESTING)!r}); import harness_build; "
        f"lib = harness_build.load('selftest', [harness_build.TESTING / 'selftest.cu']); "
        f"lib.selftest_sanitizer_bug({kind}); print('no report')"
    )
    env = dict(os.environ, LESS_CUDA_SANITIZE="address,undefined", LD_PRELOAD=libasan(),
               ASAN_OPTIONS="detect_leaks=0")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and re.search(report, done.stderr), done.stdout + done.stderr[-3000:]
    # Without the harness's fiber annotations ASan warns of false positives after the first fiber switch.
    assert "False positive error reports may follow" not in done.stderr, done.stderr[-3000:]


@pytest.mark.skipif(not SANITIZED, reason="checks the extension of `make test-sanitize` (LESS_CUDA_SANITIZE set)")
def test_extension_under_test_is_the_sanitized_build():
    import less_cuda

    less_cuda.backends()  # loads less_cuda._C
    extension = next(Path(less_cuda.__file__).parent.glob("_C*.so"))
    needed = subprocess.run(["ldd", str(extension)], capture_output=True, text=True).stdout
    assert "libasan" in needed and "libubsan" in needed, needed
    assert str(extension.resolve()).startswith(str(ROOT)), "the tests must run the copy's own sanitized build"


def test_sanitizer_names_are_validated(monkeypatch):
    sys.path.insert(0, str(ROOT / "csrc"))
    import sanitize

    monkeypatch.setenv("LESS_CUDA_SANITIZE", " address, undefined ")
    assert sanitize.requested() == ("address", "undefined")
    assert "-fsanitize=address,undefined" in sanitize.compile_flags(sanitize.requested())
    monkeypatch.setenv("LESS_CUDA_SANITIZE", "address,thread")
    with pytest.raises(ValueError, match="unsupported sanitizer.*thread"):
        sanitize.requested()
    monkeypatch.setenv("LESS_CUDA_SANITIZE", "")
    assert sanitize.requested() == () and sanitize.compile_flags(()) == [] == sanitize.link_flags(())
