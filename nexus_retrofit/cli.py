"""The `nexus-retrofit` command line: convert -> train -> eval -> push (typer + rich).

Each command lives in nexus_retrofit/commands/<name>.py and imports its heavy dependencies
(torch, transformers, vllm) inside the function, so `--help` stays fast.
"""

from __future__ import annotations

import typer

from .commands import bench as bench_commands
from .commands import convert as convert_commands
from .commands import demo as demo_commands
from .commands import evaluate as evaluate_commands
from .commands import experiment as experiment_commands
from .commands import push as push_commands
from .commands import train as train_commands

app = typer.Typer(
    name="nexus-retrofit",
    help="Upgrade pretrained LLMs to Nexus higher-order attention, fine-tune, evaluate and publish them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
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
app.command("train", context_settings=train_commands.CONTEXT_SETTINGS)(train_commands.train)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
