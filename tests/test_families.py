"""The one family table (nexus_retrofit/families.py) is what every registration and test matrix uses."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from nexus_retrofit.families import FAMILIES, class_names
from nexus_retrofit.modeling import FAMILIES as MODEL_CLASSES
from nexus_retrofit.modeling import configuration_nexus, modeling_nexus
from nexus_retrofit.vllm import ARCHITECTURES
from tests.conftest import FAMILIES as TESTED_FAMILIES


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_family_row_is_built_registered_and_tested(model_type):
    config_name, lm_name, model_name = class_names(model_type)
    config_cls, lm_cls, model_cls = MODEL_CLASSES[model_type]
    assert (config_cls, lm_cls, model_cls) == (
        getattr(configuration_nexus, config_name),  # the bundled files define the classes ...
        getattr(modeling_nexus, lm_name),
        getattr(modeling_nexus, model_name),
    )
    assert AutoConfig.for_model(config_cls.model_type).__class__ is config_cls  # ... registered ...
    assert AutoModelForCausalLM._model_mapping[config_cls] is lm_cls
    assert AutoModel._model_mapping[config_cls] is model_cls
    assert ARCHITECTURES[lm_name].endswith(f":{lm_name}")  # ... served by vLLM ...
    assert model_type in TESTED_FAMILIES  # ... and in the tests' family matrix


def test_the_tests_matrix_is_the_table():
    tested_types = {config_cls.model_type for config_cls, _, _ in TESTED_FAMILIES.values()}
    assert tested_types == set(FAMILIES)
