"""Stand-in (ours, nexus-retrofit) for transformers' tests/generation/test_utils.py, which the sdist lacks.

test_modeling_common.py imports GenerationTesterMixin from here only to check, in
test_generation_tester_mixin_inheritance, that a generative model's test class inherits it. The real
mixin's generate() tests are therefore NOT run by tests/transformers_suite (our own generation tests are
tests/modeling/); the Nexus test classes do not inherit this empty class, and that one check is listed as
not applicable in tests/transformers_suite/test_transformers_model_tests.py.
"""


class GenerationTesterMixin:
    """Empty: the sdist ships no generation tests."""
