"""transformers' own common model tests, run against the Nexus classes of every family.

Where each file comes from (docs/transformers-model-tests.md has the full table):
- transformers' tests/test_modeling_common.py (ModelTesterMixin), test_configuration_common.py (ConfigTester)
  and test_training_mixin.py: the sdist of the transformers release installed in the running env, fetched
  from the package registry at set-up by scripts/fetch_transformers_tests.py (cached in $NEXUS_VENVS, never
  committed). Found through $NEXUS_TRANSFORMERS_TESTS (the folder the script prints); when unset, this
  module runs the script itself.
- tests/generation/test_utils.py, tests/exporters/test_export.py, tests/utils/test_configuration_utils.py:
  the sdist lacks them, so ours stand in (tests/transformers_suite/standins/): the generation mixin's and
  the exporters' tests are therefore NOT run here.
- tests/causal_lm_tester.py and tests/models/*/test_modeling_*.py: not in the sdist; NexusModelTester
  below is ours.

One unittest class per (family, Nexus form) of ROTATION: every family and every form is covered, within
the CI budget (4 minutes on 2 cores). Tests that do not apply by design are skipped with their reason
from NOT_APPLICABLE (one row per test name or pattern); nothing else is skipped by us.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tempfile
import unittest
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
from safetensors.torch import save_file as safe_save_file

import nexus_retrofit.modeling as nexus_modeling
from nexus_retrofit.modeling import FAMILIES as NEXUS_CLASSES
from nexus_retrofit.modeling import modeling_nexus

pytestmark = pytest.mark.transformers_suite

ROOT = Path(__file__).resolve().parents[2]


def _fetched_folder() -> Path:
    """The folder holding `hf_tests` (the sdist's files + our stand-ins) and `site` (parameterized)."""
    folder = os.environ.get("NEXUS_TRANSFORMERS_TESTS")
    if not folder:
        script = ROOT / "scripts" / "fetch_transformers_tests.py"
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
        if out.returncode != 0:  # fail collection loudly: never a silent skip of the whole suite
            raise RuntimeError(out.stderr.strip() or f"{script} failed")
        folder = out.stdout.strip().splitlines()[-1]
    path = Path(folder)
    if not (path / "hf_tests" / "test_modeling_common.py").is_file():
        raise RuntimeError(f"NEXUS_TRANSFORMERS_TESTS={folder} holds no hf_tests/test_modeling_common.py")
    return path


_FOLDER = _fetched_folder()
sys.path[:0] = [str(_FOLDER), str(_FOLDER / "site")]

from hf_tests import test_modeling_common as hf_common  # noqa: E402
from hf_tests.test_configuration_common import ConfigTester  # noqa: E402
from hf_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask  # noqa: E402
from hf_tests.test_training_mixin import TrainingTesterMixin  # noqa: E402

# The tiny shapes of transformers' own causal-LM testers (hidden 32, 2 layers, 4 heads, 2 KV heads).
TINY = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Each family's own layout on top of TINY (as tests/conftest.py's family matrix).
FAMILY_EXTRA: dict[str, dict] = {
    "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "llama": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mistral": dict(num_key_value_heads=2, sliding_window=None),
    "qwen3": dict(num_key_value_heads=2, head_dim=8),
    # Pythia: a quarter of each head rotates, parallel residual, one KV head per query head. Head size 16
    # (not 8): a quarter of 8 is a 2-dim rotary, for which dynamic RoPE divides by 0 (dim - 2)
    "gpt_neox": dict(
        hidden_size=64,
        use_parallel_residual=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    ),
}


@dataclass(frozen=True)
class Form:
    """One (family, Nexus form) of the rotation: a test class of its own."""

    family: str
    name: str
    nexus: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the form's own config settings on top of the family's

    @property
    def class_name(self) -> str:
        stem = "".join(part.capitalize() for part in f"{self.family}_{self.name}".split("_"))
        return f"TestNexus{stem}"


# Every family once, every inner kind and every gate kind at least once, two families twice: the
# forms whose inner path is live at init (an open gate with random inner weights, or no gate) are where
# the suite's equivalence tests (eager vs sdpa, padding, caching) see the inner attention at all.
ROTATION = (
    Form("qwen2", "separate", {"inner": "separate", "gate": "open", "inner_init": "random"}),
    Form("llama", "shared", {"inner": "shared", "gate": "zero"}),
    Form("mistral", "self_ungated", {"inner": "self", "gate": "none"}),
    Form(
        "qwen3", "separate_ungated", {"inner": "separate", "gate": "none", "order": 3, "projections": "qkv"}
    ),
    Form("gpt_neox", "separate", {"inner": "separate"}),  # the conversion default: open gate, zero_out o_proj
    # Ungated shared: the outer Q/K are projections of an attention output. At the default init (std
    # 0.02) that output is ~1e-3, the outer logits ~1e-7, and RoPE scaling moves the output by less than
    # the rope-scaling tests' 1e-5 (measured 4.7e-6): a larger init gives the outer logits a real size.
    Form("gpt_neox", "shared_ungated", {"inner": "shared", "gate": "none"}, {"initializer_range": 0.2}),
)


class NexusModelTester:
    """Our ModelTester (transformers' CausalLMModelTester is not in the sdist): a tiny Nexus config of
    one family and form, and the inputs ModelTesterMixin feeds every model class."""

    def __init__(self, parent: unittest.TestCase, form: Form, batch_size: int = 3, seq_length: int = 7):
        self.parent = parent
        self.form = form
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = True
        self.config_class, self.causal_lm_class, self.base_model_class = NEXUS_CLASSES[form.family]
        self.vocab_size = TINY["vocab_size"]
        self.hidden_size = self.config_kwargs()["hidden_size"]
        self.num_hidden_layers = TINY["num_hidden_layers"]
        self.num_attention_heads = TINY["num_attention_heads"]

    def get_config(self):
        return self.config_class(**self.config_kwargs())

    def config_kwargs(self) -> dict:
        # the normalised block (defaults filled in), as the config stores it: ConfigTester compares them
        nexus = nexus_modeling.NexusConfig.from_dict(self.form.nexus).to_dict()
        return {**TINY, **FAMILY_EXTRA[self.form.family], **self.form.config, "nexus": nexus}

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


# Tests of ModelTesterMixin that cannot apply to a Nexus class by design: (test name or fnmatch
# pattern, forms it applies to or None for all, reason). Anything not listed runs.
NOT_APPLICABLE: tuple[tuple[str, tuple[str, ...] | None, str], ...] = (
    (
        "test_generation_tester_mixin_inheritance",
        None,
        "GenerationTesterMixin is not in the sdist: our stand-in is empty, so inheriting it would make this "
        "check pass without running any generate() test (tests/modeling/ test Nexus generation)",
    ),
)

# Tests of the suite that load, on purpose, a checkpoint lacking weights, to check how missing weights are
# reported and initialised. A Nexus class refuses a checkpoint that lacks its Nexus tensors by design
# (NexusCheckpointError, rather than starting them at random: check_nexus_tensors), so these run with
# that check off; test_refuses_checkpoint_without_nexus_tensors checks the refusal itself.
WITHOUT_INTEGRITY_CHECK: dict[str, str] = {
    "test_model_weights_reload_no_missing_tied_weights": "saves a checkpoint with every weight removed",
    "test_can_init_all_missing_weights": "loads an empty state dict to check `_init_weights`",
}


def _not_applicable(form: Form) -> dict[str, str]:
    """test name -> reason, for `form`."""
    names = [n for n in dir(ModelTesterMixin) if n.startswith("test_")]
    table: dict[str, str] = {}
    for pattern, forms, reason in NOT_APPLICABLE:
        if forms is not None and form.class_name not in forms:
            continue
        matched = fnmatch.filter(names, pattern)
        assert matched, f"NOT_APPLICABLE row {pattern!r} matches no test of this transformers release"
        table.update(dict.fromkeys(matched, reason))
    return table


def _skipped(name: str, reason: str):
    def test(self: unittest.TestCase) -> None:
        self.skipTest(f"not applicable to Nexus: {reason}")

    test.__name__ = name
    return test


class _NexusSuite(ModelTesterMixin):
    form: Form
    # The suite runs this only for files with a "# Copyright 2023+" header (transformers' newer models);
    # configuration_nexus.py has none, and this test is the one that catches Nexus parameters that
    # `_init_weights` misses: run it.
    test_can_init_all_missing_weights_before_2023 = True
    # TrainingTesterMixin overfits 300 steps of 64 tokens (2 x 64 = a repeated 19-token pattern); 32 tokens
    # still repeat it and halve the step (the order-3 qkv form's test took 35 s of the budget at 64)
    training_overfit_seq_length = 32

    @property
    def all_model_classes(self):
        _, lm_cls, model_cls = NEXUS_CLASSES[self.form.family]
        return (model_cls, lm_cls)

    def setUp(self) -> None:
        self.model_tester = NexusModelTester(self, self.form)
        kwargs = self.model_tester.config_kwargs()
        self.config_tester = ConfigTester(self, config_class=self.model_tester.config_class, **kwargs)

    def test_config(self) -> None:
        self.config_tester.run_common_tests()

    def test_refuses_checkpoint_without_nexus_tensors(self) -> None:
        """Ours, the other half of WITHOUT_INTEGRITY_CHECK: a checkpoint lacking the Nexus tensors its
        config implies is refused (a form with none, e.g. inner="self" ungated, loads as it is)."""
        for model_class in self.all_model_classes:
            model = model_class(self.model_tester.get_config())
            nexus = [
                n for n in model.state_dict() if any(f".{s}." in n for s in modeling_nexus.NEXUS_SUBMODULES)
            ]
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                base_only = {k: v.clone() for k, v in model.state_dict().items() if k not in nexus}
                safe_save_file(
                    base_only, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"}
                )
                if nexus:
                    with self.assertRaises(modeling_nexus.NexusCheckpointError):
                        model_class.from_pretrained(folder)
                else:
                    model_class.from_pretrained(folder)


def _without_integrity_check(name: str, reason: str):
    """The suite's test `name`, run with the Nexus checkpoint check off (see WITHOUT_INTEGRITY_CHECK)."""
    suite_test = getattr(ModelTesterMixin, name)

    def test(self: unittest.TestCase) -> None:
        with mock.patch.object(modeling_nexus, "check_nexus_tensors", lambda *args: None):
            suite_test(self)

    test.__name__ = name
    test.__doc__ = f"Adapted ({reason}): run with the Nexus checkpoint check off."
    return test


def _make_class(form: Form) -> type:
    # model_tester: TrainingTesterMixin declares it an abstract property; setUp sets it per test
    body = {"form": form, "model_tester": None, "__module__": __name__, "__qualname__": form.class_name}
    body.update({name: _without_integrity_check(name, why) for name, why in WITHOUT_INTEGRITY_CHECK.items()})
    body.update({name: _skipped(name, reason) for name, reason in _not_applicable(form).items()})
    return type(form.class_name, (TrainingTesterMixin, _NexusSuite, unittest.TestCase), body)


for _form in ROTATION:
    globals()[_form.class_name] = _make_class(_form)


def _nexus_names(kind: int) -> dict[str, str]:
    """model_type -> Nexus class name, for the suite's name tables (kind 1: causal LM, 2: base model)."""
    return {
        cfg.model_type: classes[kind].__name__ for classes in NEXUS_CLASSES.values() for cfg in classes[:1]
    }


@pytest.fixture(autouse=True)
def _register_nexus_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """ModelTesterMixin picks base models and causal LMs by name from transformers' tables, which know
    only transformers' own model types: without ours the base-model tests skip and the causal-LM ones
    prepare no labels. Patched in the suite's module only (transformers' Auto tables stay as they are)."""
    for table, kind in (("MODEL_MAPPING_NAMES", 2), ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", 1)):
        monkeypatch.setattr(hf_common, table, {**getattr(hf_common, table), **_nexus_names(kind)})


def test_rotation_covers_every_family_and_form() -> None:
    """The rotation is the whole point of the budget: every family, inner kind and gate kind once."""
    forms = [nexus_modeling.NexusConfig.from_dict(form.nexus) for form in ROTATION]
    assert {form.family for form in ROTATION} == set(NEXUS_CLASSES)
    assert {f.inner for f in forms} >= {"separate", "shared", "self"}
    assert {f.gate for f in forms} == {"open", "zero", "none"}
