"""Stand-in (ours, nexus-retrofit) for transformers' tests/exporters/test_export.py, which the sdist lacks.

ModelTesterMixin inherits ExportTesterMixin; the real one adds the torch.export / ONNX / ExecuTorch
export tests, which are therefore NOT run by tests/transformers_suite.
"""


class ExportTesterMixin:
    """Empty: the sdist ships no exporter tests."""
