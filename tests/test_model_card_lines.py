"""The model card's loading lines run as written, on the transformers of the environment that runs this.

`build_model_card` writes Python blocks a user pastes: with the package (registered classes), and
without it (`trust_remote_code`, the bundled code). Each block runs in a fresh interpreter against a
converted checkpoint in a folder (the Hub id replaced by that folder: the Hub is not reachable), the
second with `import nexus_retrofit` made to fail. CI runs this in the newest environment too
(transformers 5.25 without `kernels`), where a plain `from_pretrained` must not raise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nexus_retrofit import NexusConfig, convert
from nexus_retrofit.hub import build_model_card
from tests.conftest import tiny_base_model

ASSET = Path(__file__).resolve().parents[1] / "nexus_retrofit" / "assets" / "tiny-qwen2"  # its tokenizer
REPO_ID = "someone/tiny-nexus"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
WITHOUT_PACKAGE = "import sys\nsys.modules['nexus_retrofit'] = None  # as on a machine without it\n"
CHECK = """
assert type(model).__name__ == "NexusQwen2ForCausalLM", type(model)
print("loaded", type(model).__module__, model.config.nexus["order"])
"""


@pytest.fixture(scope="module")
def checkpoint_and_card(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("card") / "ckpt"
    model = convert(tiny_base_model("qwen2"), NexusConfig(order=2, inner="shared"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ASSET).save_pretrained(folder)
    card = str(build_model_card(folder, REPO_ID))
    return folder, [b for b in BLOCK.findall(card) if "AutoModelForCausalLM" in b]


@pytest.mark.parametrize(
    "index,package",
    [pytest.param(0, True, id="with-the-package"), pytest.param(1, False, id="trust-remote-code")],
)
def test_the_cards_loading_block_runs(checkpoint_and_card, tmp_path, index, package):
    folder, blocks = checkpoint_and_card
    assert len(blocks) == 2, blocks  # the two loading blocks this table covers
    code = blocks[index].replace(REPO_ID, str(folder)).replace(', revision="<commit sha>"', "")
    assert ("trust_remote_code=True" in code) is not package
    script = tmp_path / "block.py"
    script.write_text(("" if package else WITHOUT_PACKAGE) + code + CHECK)
    # as a user has it: no USE_HUB_KERNELS (on 5.25 without `kernels`, the package's policy applies)
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    module = run.stdout.split()[1]
    assert module.startswith("nexus_retrofit" if package else "transformers_modules"), run.stdout
