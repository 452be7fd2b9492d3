"""The package's one YAML loader: PyYAML's SafeLoader, refusing duplicate keys.

PyYAML keeps the last of two equal keys in a mapping without a word (`learning_rate` written twice
in a recipe trains with the second value). `load_yaml` raises `DuplicateKeyError` instead, naming
the key, the file and both lines. It imports nothing from the package, so any module may use it.
"""

from __future__ import annotations

from typing import Any

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *base`: merged keys may be overridden on purpose


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping states the same key twice; str() is one line naming the key, the source and both lines."""

    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark, source: str | None) -> None:
        super().__init__(
            context=f"{key!r} first stated here",
            context_mark=first,
            problem=f"duplicate key {key!r}",
            problem_mark=second,
        )
        self.key = key
        self.first_line = first.line + 1
        self.second_line = second.line + 1
        self.source = source

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return (
            f"{where}duplicate key {self.key!r} on lines {self.first_line} and {self.second_line}; "
            "keep one of them (otherwise the last would silently win)"
        )


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader whose mappings refuse a key stated twice (merge keys `<<` excepted)."""

    source: str | None = None

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                if first is not None:
                    raise DuplicateKeyError(key, first, key_node.start_mark, self.source)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml_document(text: str, source: str | None = None) -> tuple[Any, yaml.Node | None]:
    """The data of one YAML document and its node tree (for line numbers); duplicate keys raise.

    `source` (a file name) is named in a DuplicateKeyError. Syntax errors raise yaml.YAMLError as usual.
    """
    loader = UniqueKeyLoader(text)
    loader.source = source
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return data, node


def load_yaml(text: str, source: str | None = None) -> Any:
    """yaml.safe_load(text), except that a key stated twice in a mapping raises DuplicateKeyError."""
    return load_yaml_document(text, source)[0]
