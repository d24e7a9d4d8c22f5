#!/usr/bin/env bash
# `make test-install`: `pip install .` exactly as a user types it, in a fresh venv holding only the torch of
# requirements-dev.txt, from a copy of the tree as a clone has it (no in-place build, no build record). Then, from
# outside the tree: import, one op on CPU against the reference, less_cuda.backends(), the wheel's torch requirement,
# and the import error once the recorded torch is not the installed one.
#
# CPU kernels only (LESS_CUDA_SKIP_CUDA=1): the CUDA kernels would add about ten minutes on two cores, `make test`
# already builds them, and what this checks (build isolation, the torch pin, the build record) is the same for both.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=build/install-check
rm -rf "$DIR"
"${PYTHON_SYSTEM:-python3}" -m venv "$DIR/venv"
PY="$PWD/$DIR/venv/bin/python"
"$PY" -m pip install -q "$(grep -m1 '^torch==' requirements-dev.txt)"

mkdir "$DIR/src"
git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$DIR/src"
(cd "$DIR/src" && LESS_CUDA_SKIP_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" ../venv/bin/pip install .)

cd "$DIR"  # not the source tree: the import must find the installed package
"$PY" - <<'EOF'
import importlib.metadata
import pathlib
import subprocess
import sys

import torch

import less_cuda
from less_cuda.core import reference

assert "site-packages" in less_cuda.__file__, f"imported {less_cuda.__file__}, not the installed package"
backends = less_cuda.backends()
print(backends)
assert backends.cpu and not backends.cuda and backends.torch_version == torch.__version__, backends

q, k, v = torch.randn(2, 4, 64), torch.randn(2, 2, 9, 64), torch.randn(2, 2, 9, 64)
pos = torch.arange(9, dtype=torch.int32).expand(2, 2, 9).contiguous()
out, probs = less_cuda.less_decode_attention(q, k, v, pos)
expected, _ = reference.decode_attention(q, k, v, pos, None, None, None, 64**-0.5)
torch.testing.assert_close(out, expected)

# The wheel requires the torch it was built against, which pip found already installed.
requirement = f"torch=={torch.__version__.split('+')[0]}"
assert requirement in importlib.metadata.requires("less_cuda"), importlib.metadata.requires("less_cuda")

record = pathlib.Path(less_cuda.__file__).with_name("_build_info.py")
record.write_text(record.read_text().replace(repr(str(torch.__version__)), repr("2.0.0+cu999")))
# `import less_cuda` alone loads nothing: the first op does.
first_op = "from less_cuda import less_decode_attention"
broken = subprocess.run([sys.executable, "-c", first_op], capture_output=True, text=True)
assert broken.returncode != 0 and "built against torch 2.0.0+cu999" in broken.stderr, broken.stderr
print(broken.stderr.strip().splitlines()[-1])
print("install check: passed")
EOF
