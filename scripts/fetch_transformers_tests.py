"""Fetch transformers' own common model tests for the release installed in a Python env.

    python scripts/fetch_transformers_tests.py [--python ENV/bin/python]

Downloads (once) the sdist of the transformers release that `--python` has installed into
`$NEXUS_VENVS/transformers-tests/` (default ~/.cache/nexus-retrofit/venvs, scripts/test.sh's cache),
extracts the tests/*.py files that tests/transformers_suite needs into `<that>/<version>/hf_tests/`,
copies our stand-ins for the files the sdist lacks (tests/transformers_suite/standins/) next to them,
installs `parameterized` (which those tests import and our envs lack) into `<that>/<version>/site/`,
and prints the folder that holds `hf_tests` and `site`. Idempotent. Nothing is committed: the sdist files come from the package registry at set-up.
Fails in one line (exit 1) when the sdist cannot be had.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# scripts/test.sh's environment cache (NEXUS_VENVS), where the vLLM sources are fetched too
VENVS = os.environ.get("NEXUS_VENVS") or Path.home() / ".cache" / "nexus-retrofit" / "venvs"
CACHE = Path(VENVS) / "transformers-tests"
STANDINS = ROOT / "tests" / "transformers_suite" / "standins"
# tests/<file> of the sdist that tests/transformers_suite imports. Not the tensor-parallel and FSDP
# mixins: they need tests/distributed_testing_utils.py, which the sdist lacks, and spawn ranks (see
# docs/transformers-model-tests.md); what the other files import but the sdist lacks is our stand-ins.
SDIST_FILES = (
    "test_modeling_common.py",
    "test_configuration_common.py",
    "test_training_mixin.py",
)
# transformers' own testing extra pins parameterized>=0.9 (older ones break pytest collection of .expand)
PARAMETERIZED = "parameterized==0.9.0"


def fail(message: str) -> None:
    print(f"fetch_transformers_tests: {message}", file=sys.stderr)
    raise SystemExit(1)


def installed_version(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        fail(f"cannot import transformers with {python}: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout.strip()


def download_sdist(python: str, version: str) -> Path:
    """The cached sdist of `version` (pip download on the first call)."""
    folder = CACHE / "sdist"
    tarball = folder / f"transformers-{version}.tar.gz"
    if tarball.is_file():
        return tarball
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
    out = subprocess.run(
        [*cmd, f"transformers=={version}", "-d", str(folder)], capture_output=True, text=True
    )
    if out.returncode != 0 or not tarball.is_file():
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        fail(f"cannot download the sdist of transformers=={version} from the package registry: {last}")
    return tarball


def extract(tarball: Path, version: str, dest: Path) -> None:
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(tarball) as tar:
        for name in SDIST_FILES:
            try:
                member = tar.getmember(prefix + name)
            except KeyError:
                fail(f"{tarball.name} has no tests/{name}: this release's sdist does not ship it")
            data = tar.extractfile(member)
            assert data is not None
            (dest / name).write_bytes(data.read())


def install_parameterized(python: str, site: Path) -> None:
    if (site / "parameterized").is_dir():
        return
    cmd = [python, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), PARAMETERIZED]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"cannot install {PARAMETERIZED}: {(out.stderr.strip().splitlines() or ['no output'])[-1]}")


def fetch(python: str) -> Path:
    version = installed_version(python)
    base = CACHE / version
    dest = base / "hf_tests"
    tarball = download_sdist(python, version)
    complete = dest / ".complete"  # what was extracted: a changed SDIST_FILES extracts again
    stamp = " ".join((version, *SDIST_FILES)) + "\n"
    if not complete.is_file() or complete.read_text() != stamp:
        tmp = base / "hf_tests.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        extract(tarball, version, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    # the stand-ins are ours and may change: copied on every call (cheap), never cached
    for src in STANDINS.rglob("*.py"):
        target = dest / src.relative_to(STANDINS)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    complete.write_text(stamp)
    install_parameterized(python, base / "site")
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--python", default=sys.executable, help="the env whose transformers release to fetch"
    )
    args = parser.parse_args()
    print(fetch(args.python))


if __name__ == "__main__":
    main()
