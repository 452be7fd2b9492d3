"""Fetch the Python sources the vLLM layer tests read, for every tested GPU vLLM release.

    python scripts/fetch_vllm_sources.py            # each release of nexus_retrofit.vllm.TESTED_VLLM

A GPU vLLM wheel cannot be installed here (it needs CUDA torch), but its Python files are enough for
tests/vllm/test_vllm_layers.py, which reads vLLM's constructors and the modules the plugin imports with
`ast`. For each release this downloads the wheel (`pip download --no-deps`), extracts only those files
into `$NEXUS_VENVS/vllm-sources/<version>/` (default ~/.cache/nexus-retrofit/venvs, as scripts/test.sh) and deletes the wheel. A
release whose files are already there (same file list, in `.files`) is not downloaded again. A wheel
that cannot be had fails in one line naming it.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "nexus_retrofit" / "vllm"
# the files holding the constructors the tests compare (the Nexus Qwen layers skip vLLM's own)
MODEL_FILES = ("qwen2", "qwen3", "llama")
STAMP = ".files"


def tested_releases() -> tuple[str, ...]:
    """`TESTED_VLLM` of nexus_retrofit/vllm/__init__.py, read, not imported (the package imports torch)."""
    for node in ast.parse((PLUGIN / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "TESTED_VLLM" for t in node.targets):
            return ast.literal_eval(node.value)
    sys.exit("fetch_vllm_sources: no TESTED_VLLM in nexus_retrofit/vllm/__init__.py")


def plugin_vllm_modules() -> list[str]:
    """Every vLLM module the plugin's files import from (`from vllm.x import ...`)."""
    modules = set()
    for path in sorted(PLUGIN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("vllm")
            ):
                modules.add(node.module)
    return sorted(modules)


def wanted_files() -> list[str]:
    """Paths inside the wheel: each module as `a/b.py` or, for a package, `a/b/__init__.py`."""
    modules = {f"vllm.model_executor.models.{name}" for name in MODEL_FILES} | set(plugin_vllm_modules())
    files = set()
    for module in modules:
        stem = module.replace(".", "/")
        files |= {f"{stem}.py", f"{stem}/__init__.py"}
    return sorted(files)


def fetch(version: str, files: list[str], dest: Path) -> bool:
    """Extract `files` of vllm==version into dest; False when they were there already."""
    stamp = dest / STAMP
    if stamp.is_file() and stamp.read_text().split() == files:
        return False
    shutil.rmtree(dest, ignore_errors=True)  # only ever a folder of this script's own
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"vllm=={version}", "-d", tmp]
        done = subprocess.run(pip, capture_output=True, text=True)
        wheels = list(Path(tmp).glob(f"vllm-{version}-*.whl"))
        if done.returncode or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            sys.exit(f"fetch_vllm_sources: cannot get the vllm=={version} wheel ({last})")
        with zipfile.ZipFile(wheels[0]) as wheel:
            # a module is a file or a package: of each pair of candidates, the wheel holds one
            for member in sorted(set(files) & set(wheel.namelist())):
                wheel.extract(member, dest)
    stamp.write_text("\n".join(files) + "\n")  # last: an interrupted run is redone
    return True


def main() -> None:
    # scripts/test.sh's environment cache (NEXUS_VENVS), where its other fetched sources live too
    venvs = os.environ.get("NEXUS_VENVS") or Path.home() / ".cache" / "nexus-retrofit" / "venvs"
    root = Path(venvs) / "vllm-sources"
    root.mkdir(parents=True, exist_ok=True)
    files = wanted_files()
    for version in tested_releases():
        if fetch(version, files, root / version):
            print(f"== vllm {version}: sources extracted to {root / version}")


if __name__ == "__main__":
    main()
