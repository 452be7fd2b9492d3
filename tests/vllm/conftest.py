"""Fixtures of the vLLM tests: engines in the pytest process, without leaking into other tests."""

from __future__ import annotations

import os

import pytest

# vLLM's own log handler keeps the sys.stdout of the moment it was configured, a capture stream that
# pytest or typer's CliRunner closes later ("Logging error ... I/O operation on closed file"). Let its
# records propagate to the root logger instead, which pytest captures. Set before vLLM is imported.
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")


@pytest.fixture(scope="module")
def vllm_in_process():
    """Engine core in this process, one torch thread, and torch.set_num_threads given back after.

    - VLLM_ENABLE_V1_MULTIPROCESSING=0: a spawned engine core re-imports vLLM, 15-60 s per engine on
      a loaded 2-core machine. (Tensor-parallel workers are still spawned; `vllm serve` runs as its
      own processes in test_vllm_serve.py.)
    - VLLM_CPU_OMP_THREADS_BIND=nobind: do not pin the pytest process to one core.
    - One torch thread: spinning OpenMP threads on busy shared cores slow these tiny models ~50x.
    - vLLM's CPU worker replaces torch.set_num_threads by a no-op in its process (here, this one):
      the real function is put back when the module ends.
    """
    import torch

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "set_num_threads", torch.set_num_threads)
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)
