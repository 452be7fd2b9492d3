"""transformers 5.25 turns Hub kernels on by default and fails every load without the `kernels` package.

The policy (README, "Tested matrix"): where `kernels` is missing or of another version, a Nexus
`from_pretrained` (the package's classes and the bundled code under `trust_remote_code`) loads with
`use_kernels=False` and says so once; the commands set transformers' own switch USE_HUB_KERNELS=0
with one notice. An explicit USE_HUB_KERNELS or `use_kernels` wins. On releases before 5.25 nothing
changes. The rows run on every transformers CI has (the newest environment is 5.25 without `kernels`).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from typer.testing import CliRunner

from nexus_retrofit import NexusConfig, convert
from nexus_retrofit.cli import app
from nexus_retrofit.modeling.modeling_nexus import kernels_unavailable
from tests.conftest import save_tiny_base, tiny_base_model

WANTS_KERNELS = Version(transformers.__version__).release >= (5, 25)  # Hub kernels on by default


@pytest.fixture(autouse=True)
def no_kernels_switch(monkeypatch):
    """USE_HUB_KERNELS unset for the row (restored after it): what a user's shell has."""
    monkeypatch.setenv("USE_HUB_KERNELS", "unset-by-the-test")
    monkeypatch.delenv("USE_HUB_KERNELS")


@pytest.fixture
def nexus_dir(tmp_path):
    torch.manual_seed(0)
    model = convert(tiny_base_model(), NexusConfig(gate="zero"))
    model.save_pretrained(tmp_path / "nexus")
    return tmp_path / "nexus"


def test_a_nexus_checkpoint_loads_without_kernels(nexus_dir):
    from transformers import AutoModelForCausalLM

    import nexus_retrofit  # noqa: F401

    if not WANTS_KERNELS:
        assert not kernels_unavailable()  # before 5.25 nothing changes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(nexus_dir)
    notices = [w for w in caught if "use_kernels=False" in str(w.message)]
    assert len(notices) == (1 if kernels_unavailable() else 0)
    assert type(model).__name__ == "NexusQwen2ForCausalLM"


def test_the_bundled_code_loads_without_kernels_or_the_package(nexus_dir):
    """A checkpoint loaded with trust_remote_code in a process that cannot import the package."""
    script = (
        "import sys; sys.modules['nexus_retrofit'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(nexus_dir)!r}, trust_remote_code=True)\n"
        "print(type(m).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "NexusQwen2ForCausalLM"


def test_convert_runs_without_kernels(tmp_path):
    """The command loads a stock source model: without the policy, 5.25 fails it ("Kernels are not available")."""
    save_tiny_base(tmp_path / "base")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "base"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert ("without Hub kernels" in result.output) == kernels_unavailable()
