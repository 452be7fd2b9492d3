"""Training recipes: open-r1-style YAML + `--key value` overrides -> typed, validated dataclasses.

A recipe is a flat mapping of TRL `ScriptArguments`, `SFTConfig` and `ModelConfig` fields (the names
open-r1 recipes use) plus an optional `nexus:` block. With the block, a base model is converted on the
fly; without it the same recipe runs the standard-SFT baseline. Everything is checked before a model
or dataset is touched: an unknown key, a renamed open-r1 key, or a bad `nexus:` value fails at once
with the key in the message.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

from ..hub import REDACTED  # the one placeholder for a secret value, which push recognises
from ..modeling import NexusConfig
from ..yaml_loading import DuplicateKeyError, load_yaml
from .data import parse_mixture
from .errors import RecipeError
from .lora import base_lora_config

logger = logging.getLogger(__name__)

CONFIG_FILE = "nexus_train_config.yaml"  # the resolved recipe, written beside the weights
RESERVED = ("nexus", "env")  # recipe keys that are not dataclass fields
# `env:` values are often credentials (HF_TOKEN, WANDB_API_KEY): the saved recipe keeps the keys only.

# open-r1 recipes were written for transformers 4.x / TRL 0.x. Old name -> current name; an alias is
# applied only when the installed version lacks the old name and has the new one.
RENAMED = {
    "warmup_ratio": ("warmup_steps", "a value in [0, 1) is read as a ratio of the training steps"),
    "max_seq_length": ("max_length", ""),
    "torch_dtype": ("dtype", ""),
    "evaluation_strategy": ("eval_strategy", ""),
    "activation_checkpointing": ("gradient_checkpointing", ""),
    "gradient_checkpointing": ("activation_checkpointing", ""),
}

# Keys of open-r1's own SFTConfig that this toolkit deliberately leaves out.
OPEN_R1_ONLY = {
    "benchmarks": "evaluate with `nexus-retrofit eval` after training",
    "callbacks": "nexus-retrofit installs its own callbacks",
    "system_prompt": "put the system turn in the data or the chat template",
    "hub_model_revision": "use `nexus-retrofit push` to publish to a branch",
    "overwrite_hub_revision": "use `nexus-retrofit push`",
    "push_to_hub_revision": "use `nexus-retrofit push`",
    "wandb_entity": "set the WANDB_ENTITY environment variable (recipe `env:` block)",
    "wandb_project": "set the WANDB_PROJECT environment variable (recipe `env:` block)",
    "wandb_run_group": "set the WANDB_RUN_GROUP environment variable (recipe `env:` block)",
    "optimization_level": "not a transformers setting",
}

UNSUPPORTED = {  # fields that parse but that this command does not implement
    "load_in_8bit": "quantised training is not supported",
    "load_in_4bit": "quantised training is not supported",
}


@dataclass
class NexusScriptArguments(ScriptArguments):
    """TRL's ScriptArguments plus open-r1's dataset mixture and chat template, and an overwrite switch."""

    dataset_mixture: dict | str | None = field(
        default=None,
        metadata={
            "help": "open-r1 dataset mixture: {datasets: [{id, config, split, columns, weight}], seed, "
            "test_split_size}. `id` is a Hub dataset or a local .jsonl/.json/.parquet file or folder. "
            "Replaces dataset_name."
        },
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat template set on the tokenizer before training (open-r1)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Allow writing into a non-empty output_dir that holds another run (its checkpoints are removed)."
        },
    )
    dataset_max_dropped_share: float = field(
        default=0.0,
        metadata={
            "help": "Largest share (0-1) of training rows that may have no completion tokens to learn from "
            "(truncated away by max_length, empty, or not ending on the assistant's turn) before the run "
            "refuses to start; 0: any such row is an error."
        },
    )

    def __post_init__(self) -> None:
        share = self.dataset_max_dropped_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise RecipeError(f"dataset_max_dropped_share must be a number in [0, 1], got {share!r}")
        self.dataset_max_dropped_share = float(share)
        if isinstance(self.dataset_mixture, str):
            try:
                self.dataset_mixture = json.loads(self.dataset_mixture)
            except json.JSONDecodeError as e:
                raise RecipeError(
                    f"dataset_mixture must be a mapping (YAML, or JSON on the command line): {e}"
                ) from None


# Measured (eval/results/experiments/retrofit/README.md): the gates' learning rate, as a multiple of
# learning_rate, for each gate kind (a zero gate barely moves at SFT learning rates without x100).
DEFAULT_GATE_LR_MULTIPLIER: dict[str, float | None] = {"zero": 100.0, "open": 1.0, "none": None}


@dataclass
class NexusTrainArguments:
    """The `nexus:` block: the converter's settings plus how the new parameters train.

    Architecture fields left unset take NexusConfig's defaults when the base model is converted, or the
    model's own settings when it is already a Nexus model.
    """

    order: int | None = field(default=None, metadata={"help": "Attention order m (1 = standard)."})
    projections: Any = field(default=None, metadata={"help": "Refined projections: q, qk or qkv."})
    inner: str | None = field(default=None, metadata={"help": "separate, shared or self."})
    gate: str | None = field(default=None, metadata={"help": "zero, open or none."})
    inner_init: str | None = field(default=None, metadata={"help": "random, copy or zero_out (separate)."})
    gate_shape: str | None = field(default=None, metadata={"help": "channel, head or scalar."})
    gate_fn: str | None = field(default=None, metadata={"help": "identity or tanh."})
    gate_lr_multiplier: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the gates, as a multiple of learning_rate (default: measured per gate "
            "kind, 100 for gate zero, 1 for open; a checkpoint converted by an older release may record one)."
        },
    )
    inner_lr_multiplier: float = field(
        default=3.0,  # measured at the demo's budget: path 1-2% of ||X||, no accuracy lost (x10 starts to)
        metadata={
            "help": "Learning rate of the inner modules (and of the gates unless gate_lr_multiplier is set), "
            "as a multiple of learning_rate."
        },
    )
    inner_only_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps at the start during which only the Nexus parameters train."},
    )

    # NexusConfig's fields (the checkpoint's architecture); the others say how the new parameters train
    ARCHITECTURE = ("order", "projections", "inner", "gate", "inner_init", "gate_shape", "gate_fn")

    def __post_init__(self) -> None:
        m = self.inner_lr_multiplier
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
            raise RecipeError(f"nexus.inner_lr_multiplier must be a number > 0, got {m!r}")
        self.inner_lr_multiplier = float(m)
        g = self.gate_lr_multiplier
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0):
            raise RecipeError(f"nexus.gate_lr_multiplier must be a number > 0, got {g!r}")
        self.gate_lr_multiplier = None if g is None else float(g)
        s = self.inner_only_steps
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise RecipeError(f"nexus.inner_only_steps must be an integer >= 0, got {s!r}")
        try:  # validate the architecture settings now, not after loading the model
            self.nexus_config()
        except ValueError as e:
            raise RecipeError(str(e).replace("NexusConfig.", "nexus.")) from None

    def architecture(self) -> dict[str, Any]:
        """The architecture settings the recipe states explicitly."""
        return {k: getattr(self, k) for k in self.ARCHITECTURE if getattr(self, k) is not None}

    def nexus_config(self) -> NexusConfig:
        """The NexusConfig to convert a base model with (defaults for unset fields)."""
        return NexusConfig(**self.architecture())

    def conflicts(self, existing: NexusConfig) -> dict[str, tuple[Any, Any]]:
        """Stated settings that differ from an existing Nexus model's: key -> (recipe, model)."""
        stated = NexusConfig(**{**existing.to_dict(), **self.architecture()})
        return {
            k: (getattr(stated, k), getattr(existing, k))
            for k in self.architecture()
            if getattr(stated, k) != getattr(existing, k)
        }

    def gate_lr(self, config: NexusConfig, recorded: float | None = None) -> tuple[float | None, str | None]:
        """The gates' learning-rate multiplier this run uses, and a notice when it is not the recipe's:
        the recipe's, else one an older checkpoint recorded, else the measured default for the gate."""
        if self.gate_lr_multiplier is not None:
            return self.gate_lr_multiplier, None
        if recorded is not None:
            return float(recorded), (
                f"nexus.gate_lr_multiplier: {recorded} as the checkpoint's nexus block records it (older "
                "releases stored it there); set nexus.gate_lr_multiplier in the recipe to choose another"
            )
        return DEFAULT_GATE_LR_MULTIPLIER[config.gate], None

    def resolved(self, config: NexusConfig, gate_lr_multiplier: float | None = None) -> dict[str, Any]:
        """The full block as it ran (for the saved recipe)."""
        return {
            **config.to_dict(),
            "gate_lr_multiplier": gate_lr_multiplier,
            "inner_lr_multiplier": self.inner_lr_multiplier,
            "inner_only_steps": self.inner_only_steps,
        }


@dataclass
class Recipe:
    """A parsed recipe: TRL's three argument dataclasses, the nexus block, and the recipe as given."""

    script: NexusScriptArguments
    training: SFTConfig
    model: ModelConfig
    nexus: NexusTrainArguments | None
    values: dict[str, Any]  # explicit settings after overrides, canonical names, typed
    notes: list[str] = field(default_factory=list)  # renamed keys and other one-line notices
    env: dict[str, str] = field(default_factory=dict, repr=False)  # the `env:` block; never persisted

    def apply_env(self) -> list[str]:
        """Set the recipe's `env:` variables (the run does this once it starts, never the parser); a
        redacted value (a saved recipe) keeps the environment's. Returns one-line notices."""
        notes = []
        for name, value in self.env.items():
            if value == REDACTED:
                if name not in os.environ:
                    notes.append(
                        f"env.{name} was redacted when the recipe was saved and is not set in the environment"
                    )
                continue
            os.environ[name] = value
        return notes

    def to_yaml(self, nexus_resolved: dict[str, Any] | None = None) -> str:
        """The recipe as it runs, re-usable as a recipe: explicit settings plus the resolved nexus block."""
        values = dict(self.values)
        if self.nexus is not None:
            values["nexus"] = nexus_resolved or {
                **self.nexus.architecture(),
                "inner_lr_multiplier": self.nexus.inner_lr_multiplier,
                "inner_only_steps": self.nexus.inner_only_steps,
            }
        return yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=120)


DATACLASSES = (NexusScriptArguments, SFTConfig, ModelConfig)


def _field_names() -> set[str]:
    return {f.name for cls in DATACLASSES for f in dataclasses.fields(cls)}


def _load(recipe: dict | str | os.PathLike) -> dict[str, Any]:
    if isinstance(recipe, dict):
        return copy.deepcopy(recipe)
    path = Path(recipe)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path.resolve()}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), source=f"recipe {path}")
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"recipe {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8"
        ) from None
    except DuplicateKeyError as e:
        raise RecipeError(str(e)) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of settings, got {type(data).__name__}")
    return data


class _RenamedOption(argparse.Action):
    """`--OLD value` for an open-r1 name that transformers/TRL renamed: stored as the new field, noted."""

    def __init__(self, *args: Any, notes: list[str], fields: set[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.notes, self.fields = notes, fields

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        _canonical(str(option)[2:], self.fields, self.notes, values)  # the note, and warmup_ratio's range
        setattr(namespace, self.dest, values)


def _typed(name: str, kind: type) -> Callable[[str], Any]:
    """An argparse type for `--nexus.NAME`, failing with the message the recipe's own check gives."""

    def convert(raw: str) -> Any:
        try:
            return kind(raw)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"nexus.{name} must be {what}, got {raw!r}") from None

    return convert


NEXUS_OPTION_TYPES = {
    "order": int,
    "inner_only_steps": int,
    "inner_lr_multiplier": float,
    "gate_lr_multiplier": float,
}


def _command_line_parser(fields: set[str], notes: list[str]) -> TrlParser:
    """TrlParser over TRL's three dataclasses, taught the recipe's own command-line forms:
    `--nexus.KEY VALUE` (one per nexus setting, typed), `--nexus none` (the baseline from a Nexus
    recipe), and open-r1's old names for renamed fields. argparse does all the parsing."""
    parser = TrlParser(DATACLASSES, allow_abbrev=False, exit_on_error=False)
    for f in dataclasses.fields(NexusTrainArguments):
        kind = NEXUS_OPTION_TYPES.get(f.name)
        parser.add_argument(
            f"--nexus.{f.name}",
            dest=f"nexus.{f.name}",
            type=_typed(f.name, kind) if kind else str,
            default=argparse.SUPPRESS,
            help=f.metadata.get("help"),
        )
    parser.add_argument(
        "--nexus",
        type=str.lower,
        choices=("none", "null", "false"),
        default=argparse.SUPPRESS,
        help="Run the standard-SFT baseline from a Nexus recipe (set single settings with --nexus.KEY VALUE).",
    )
    field_actions = {action.dest: action for action in parser._actions}
    for old, (new, _) in RENAMED.items():
        if old not in fields and new in fields:
            target = field_actions[new]
            parser.add_argument(
                f"--{old}",
                dest=new,
                type=target.type,
                nargs=target.nargs,
                const=target.const,
                choices=target.choices,
                default=argparse.SUPPRESS,
                action=_RenamedOption,
                notes=notes,
                fields=fields,
            )
    return parser


_UNSET = object()


def _given(parser: TrlParser, argv: list[str]) -> list[str]:
    """The destinations the command line sets, as argparse reads it (a namespace pre-filled with a
    marker keeps argparse from writing the defaults)."""
    probe = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != argparse.SUPPRESS})
    namespace, _ = parser.parse_known_args(argv, namespace=probe)
    return [dest for dest, value in vars(namespace).items() if value is not _UNSET]


def _canonical(key: str, fields: set[str], notes: list[str], value: Any = None) -> str:
    """Map a key to the installed field name, noting open-r1 names that were renamed."""
    key = key.strip()
    if not key.startswith("nexus.") and key not in fields and key.replace("-", "_") in fields:
        key = key.replace("-", "_")
    if key in fields or key in RESERVED or key.startswith("nexus."):
        return key
    if key in RENAMED and RENAMED[key][0] in fields:
        new, why = RENAMED[key]
        notes.append(
            f"`{key}` is `{new}` in transformers/TRL as installed; using {new}" + (f" ({why})" if why else "")
        )
        if key == "warmup_ratio" and value is not None:
            try:
                ratio = float(value)
            except (TypeError, ValueError):
                raise RecipeError(f"warmup_ratio must be a number in [0, 1), got {value!r}") from None
            if not 0 <= ratio < 1:
                raise RecipeError(
                    f"warmup_ratio must be in [0, 1), got {value!r} (use warmup_steps for a step count)"
                )
        return new
    return key


def _unknown(keys: list[str], fields: set[str]) -> None:
    problems = []
    for key in keys:
        if key in OPEN_R1_ONLY:
            problems.append(
                f"'{key}' is an open-r1 setting that nexus-retrofit train does not implement ({OPEN_R1_ONLY[key]})"
            )
            continue
        close = difflib.get_close_matches(key, sorted(fields | set(RESERVED)), n=1)
        problems.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    if problems:
        raise RecipeError(
            "unknown recipe key(s): " + "; ".join(problems) + ". Remove them or fix the spelling."
        )


def _nexus_block(block: Any, overrides: dict[str, Any]) -> NexusTrainArguments | None:
    if block is None and not overrides:
        return None
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise RecipeError(f"nexus must be a mapping of Nexus settings, got {block!r}")
    block = {**block, **overrides}
    allowed = [f.name for f in dataclasses.fields(NexusTrainArguments)]
    unknown = sorted(set(block) - set(allowed))
    if unknown:
        hints = [
            f"nexus.{k}"
            + (f" (did you mean nexus.{m[0]}?)" if (m := difflib.get_close_matches(k, allowed, n=1)) else "")
            for k in unknown
        ]
        raise RecipeError(f"unknown key(s) in the nexus block: {', '.join(hints)}; allowed: {allowed}")
    return NexusTrainArguments(**block)


def _typed_values(explicit: list[str], parsed: tuple, env: dict | None) -> dict[str, Any]:
    """Explicitly set keys with their parsed (typed) values, in recipe order, tokens left out."""
    script, training, model = parsed
    sources = [dataclasses.asdict(script), training.to_dict(), dataclasses.asdict(model)]
    values: dict[str, Any] = {}
    for key in explicit:
        if key.endswith("_token") and key.startswith("hub"):
            continue  # never write credentials
        for source in sources:
            if key in source:
                values[key] = source[key]
                break
    if env:
        values["env"] = {str(name): REDACTED for name in env}  # never persist the values (secrets)
    return values


def _check_steps(training: SFTConfig, script: NexusScriptArguments) -> None:
    """max_steps 0 or below -1 would train 1 step (or num_train_epochs epochs) without a word; a
    streamed dataset has no length, so epochs cannot be turned into steps (the Trainer would refuse
    only once the model is loaded)."""
    steps = training.max_steps
    if steps == 0 or steps < -1:
        raise RecipeError(
            f"max_steps must be a positive number of optimizer steps, or -1 to train num_train_epochs "
            f"epochs; got {steps}"
        )
    if steps == -1 and script.dataset_streaming:
        raise RecipeError(
            "dataset_streaming: true needs max_steps (a streamed dataset has no length, so num_train_epochs "
            "cannot be turned into steps): set max_steps"
        )
    if steps == -1 and not training.num_train_epochs > 0:
        raise RecipeError(
            f"num_train_epochs must be > 0 when max_steps is -1, got {training.num_train_epochs}"
        )


def _collect(
    raw: dict[str, Any], overrides: dict[str, Any] | None, fields: set[str], notes: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Recipe + mapping overrides -> (settings, nexus overrides), canonical names."""
    config = {_canonical(str(key), fields, notes, value): value for key, value in raw.items()}
    nexus_overrides: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        key = _canonical(str(key), fields, notes, value)
        if key == "nexus" and isinstance(value, dict) and isinstance(config.get("nexus"), dict):
            nexus_overrides.update(value)
        elif key.startswith("nexus."):
            nexus_overrides[key[len("nexus.") :]] = value
        else:
            config[key] = value
    return config, nexus_overrides


def _check_leftovers(remaining: list[str], fields: set[str]) -> None:
    """What argparse could not place: unknown keys (with a suggestion), or a stray value."""
    keys = [token[2:].partition("=")[0] for token in remaining if token.startswith("--")]
    if keys:
        _unknown(keys, fields)
    if remaining:
        raise RecipeError(f"override {remaining[0]!r} is not of the form --key value")


def parse_recipe(
    recipe: dict | str | os.PathLike,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Recipe:
    """Parse a recipe (YAML path or mapping) and overrides into a validated Recipe.

    As in open-r1's `sft.py`, the recipe's settings become TrlParser's defaults and the command line
    is parsed over them. `overrides` is a list of command-line strings (`--key value`, `--key=value`,
    `--flag`, `--nexus.order 3`, `--nexus none`) or a mapping of typed values (`{"max_steps": 5,
    "nexus": {...}}`); they win over the recipe. Raises RecipeError naming the key on any problem.
    """
    fields = _field_names()
    notes: list[str] = []
    argv = [str(token) for token in overrides] if isinstance(overrides, (list, tuple)) else []
    mapping = overrides if isinstance(overrides, dict) else None
    config, nexus_overrides = _collect(_load(recipe), mapping, fields, notes)
    _unknown([k for k in config if k not in fields and k not in RESERVED], fields)
    nexus_block = config.pop("nexus", None)
    env = config.pop("env", None)
    if env is not None and not isinstance(env, dict):
        raise RecipeError(f"env must be a mapping of environment variables, got {env!r}")

    parser = _command_line_parser(fields, notes)
    leftover = parser.set_defaults_with_config(**config)
    if leftover:  # should have been caught above
        _unknown([leftover[i][2:] for i in range(0, len(leftover), 2)], fields)
    try:
        given = _given(parser, argv)
        *outputs, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except RecipeError:
        raise
    except argparse.ArgumentError as e:  # a value of the wrong type, from the recipe or the command line
        raise RecipeError(f"invalid recipe value: {e}") from None
    except (ValueError, TypeError) as e:  # a dataclass rejected a value (e.g. an unknown lr_scheduler_type)
        raise RecipeError(f"invalid recipe value: {e}") from None
    _check_leftovers(remaining, fields)
    script, training, model = outputs[:3]
    command_line = vars(outputs[3]) if len(outputs) > 3 else {}  # the --nexus options
    nexus_overrides.update({k[len("nexus.") :]: v for k, v in command_line.items() if k.startswith("nexus.")})
    if "nexus" in command_line:
        if nexus_overrides:
            raise RecipeError("--nexus none runs the baseline: leave out the --nexus.KEY overrides")
        nexus_block = None
    nexus = _nexus_block(nexus_block, nexus_overrides)
    for key, why in UNSUPPORTED.items():
        if getattr(model, key, None):
            raise RecipeError(f"{key} is not supported by nexus-retrofit train: {why}")

    explicit = list(dict.fromkeys([*config, *(dest for dest in given if dest in fields)]))
    if not model.model_name_or_path:
        raise RecipeError("model_name_or_path is required: a Hub id or a local model folder")
    if not script.dataset_name and not script.dataset_mixture:
        raise RecipeError(
            "dataset_name (or dataset_mixture) is required: a Hub dataset id or a local .jsonl/.parquet file or folder"
        )
    if "output_dir" not in explicit:
        raise RecipeError(
            "output_dir is required: the folder the checkpoints and the final model are written to"
        )

    _check_steps(training, script)
    if model.use_peft:  # the LoRA settings are checked now, not after the model is loaded
        base_lora_config(model)
    if script.dataset_mixture:
        parse_mixture(script.dataset_mixture)

    notes = list(dict.fromkeys(notes))  # argparse read the command line twice (_given)
    for note in notes:
        logger.warning("recipe: %s", note)
    return Recipe(
        script=script,
        training=training,
        model=model,
        nexus=nexus,
        values=_typed_values(explicit, (script, training, model), env),
        notes=notes,
        env={str(name): str(value) for name, value in (env or {}).items()},
    )
