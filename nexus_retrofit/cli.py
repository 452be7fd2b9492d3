"""The `nexus-retrofit` command line: convert -> train -> eval -> push (typer + rich).

Each command lives in nexus_retrofit/commands/<name>.py and imports its heavy dependencies
(torch, transformers, vllm) inside the function, so `--help` stays fast.
"""

from __future__ import annotations

import typer

from .commands import attention_maps as attention_maps_commands
from .commands import bench as bench_commands
from .commands import convert as convert_commands
from .commands import demo as demo_commands
from .commands import evaluate as evaluate_commands
from .commands import experiment as experiment_commands
from .commands import guard
from .commands import init as init_commands
from .commands import push as push_commands
from .commands import train as train_commands

app = typer.Typer(
    name="nexus-retrofit",
    help="Upgrade pretrained LLMs to Nexus higher-order attention, fine-tune, evaluate and publish them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def options(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show the libraries' logs, warnings and progress bars too."
    ),
) -> None:
    """Upgrade pretrained LLMs to Nexus higher-order attention, fine-tune, evaluate and publish them."""
    import os

    from .commands import VERBOSE_ENV

    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not verbose:
        quiet_libraries()
    hub_kernels_policy()


def hub_kernels_policy() -> None:
    """transformers 5.25 turns Hub kernels on by default in every `from_pretrained`, and then fails
    every load ("Kernels are not available") where the `kernels` package is missing or of another
    version. The commands then load with kernels off (USE_HUB_KERNELS=0, transformers' own switch),
    saying so once; an explicit USE_HUB_KERNELS in the environment wins. Light: imports nothing."""
    import os
    import sys
    from importlib.metadata import PackageNotFoundError, version

    if "USE_HUB_KERNELS" in os.environ:
        return
    try:
        release = tuple(int(x) for x in version("transformers").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return
    if release < (5, 25):
        return
    try:
        kernels = tuple(int(x) for x in version("kernels").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        kernels = None
    if kernels is not None and (0, 19) <= kernels < (0, 20):
        return
    os.environ["USE_HUB_KERNELS"] = "0"
    print(
        f"note: transformers {version('transformers')} wants the `kernels` package (>=0.19.1,<0.20), which "
        "is not installed: loading models without Hub kernels (set USE_HUB_KERNELS to choose)",
        file=sys.stderr,
    )


def quiet_libraries() -> None:
    """Output is for people: the command's own progress and summaries, not thousands of lines of
    transformers/datasets/TRL logs. Set before those libraries are imported (commands import them
    lazily); an explicit setting in the environment wins."""
    import os
    import warnings

    for name, value in (
        ("NEXUS_RETROFIT_QUIET", "1"),  # train: a progress bar without per-step log dicts
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DATASETS_VERBOSITY", "error"),
        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(name, value)
    from transformers.utils import logging as transformers_logging  # light: no model code is imported

    transformers_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings(
            "ignore", category=category, module=r"(transformers|trl|datasets|accelerate|peft)\b"
        )


app.command("convert")(convert_commands.convert)
app.command("inspect")(convert_commands.inspect)
app.add_typer(bench_commands.bench_app, name="bench")
app.command("demo")(demo_commands.demo)
# --- commands registered by other modules (one line each) ---
app.command("experiment")(experiment_commands.experiment)
app.command("eval")(evaluate_commands.eval_command)
app.command("compare")(evaluate_commands.compare_command)
app.command("grade")(evaluate_commands.grade_command)
app.command("push")(push_commands.push)
app.command("attention-maps")(attention_maps_commands.attention_maps)
app.command("train", context_settings=train_commands.CONTEXT_SETTINGS)(train_commands.train)
app.command("init")(init_commands.init)


def _guard_all(typer_app: typer.Typer) -> None:
    """Every command, in every group: one error line instead of a traceback (commands.guard)."""
    for info in typer_app.registered_commands:
        info.callback = guard(info.callback)
    for group in typer_app.registered_groups:
        _guard_all(group.typer_instance)


_guard_all(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
