"""A checkpoint says which transformers wrote it and which range its bundled code is tested on."""

from __future__ import annotations

import json

import pytest
import transformers

from nexus_retrofit import NexusConfig, convert
from nexus_retrofit.hub import build_model_card
from nexus_retrofit.inspection import inspect_checkpoint
from nexus_retrofit.modeling.configuration_nexus import TESTED_TRANSFORMERS
from tests.conftest import tiny_base_model

TESTED_RANGE = f">={TESTED_TRANSFORMERS[0]},<={TESTED_TRANSFORMERS[1]}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    convert(tiny_base_model("qwen2"), NexusConfig(order=2)).save_pretrained(folder)
    return folder


def test_config_json_records_writer_and_tested_range(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["transformers_version"] == transformers.__version__
    assert config["nexus_tested_transformers"] == TESTED_RANGE


def test_the_installed_release_is_inside_the_tested_range():
    """CI runs the newest release the package admits: it must be the range's upper end or below."""
    from nexus_retrofit.modeling.configuration_nexus import _release

    low, high = (_release(v) for v in TESTED_TRANSFORMERS)
    assert low <= _release(transformers.__version__) <= high, (transformers.__version__, TESTED_TRANSFORMERS)


@pytest.mark.parametrize(
    "stored,shown",
    [
        pytest.param(TESTED_RANGE, TESTED_RANGE, id="recorded"),
        pytest.param(None, None, id="written-before-it-was-recorded"),
    ],
)
def test_inspect_reports_what_the_file_says(checkpoint, tmp_path, stored, shown):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in checkpoint.iterdir():
        (folder / f.name).symlink_to(f)
    config = json.loads((checkpoint / "config.json").read_text())
    if stored is None:
        config.pop("nexus_tested_transformers")
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    report = inspect_checkpoint(folder)
    assert report.written_with_transformers == transformers.__version__
    assert report.code_tested_on_transformers == shown


def test_model_card_names_both(checkpoint):
    text = str(build_model_card(checkpoint, "me/tiny-nexus"))
    assert f"| Written with | transformers {transformers.__version__} |" in text
    assert f"| Bundled modeling code tested on | transformers {TESTED_RANGE} |" in text
