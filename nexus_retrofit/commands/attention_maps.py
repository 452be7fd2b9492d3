"""`nexus-retrofit attention-maps CKPT`: the average attention maps of a Nexus checkpoint as PNG files
(the paper's Figure 2), with `maps.json` saying what each one is.

The maps come from nexus_retrofit.attention_maps (the model's own forward, every attention call through
transformers' dispatch). The base map is a second model's `outer` map on the same token ids: the model
given with --base, else the `base_model` the checkpoint's config records when that is a local folder
here, else none (a note says so). Turning the inner levels off in the checkpoint itself would not be the
base model once training has changed the shared weights, so that is not offered as "base".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from ..demo.assets import ASSETS
from . import fail, one_line

if TYPE_CHECKING:
    from types import ModuleType

    import numpy as np
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    from ..attention_maps import AttentionMap

console = Console(stderr=True)
DEFAULT_ROOT = Path("runs/attention-maps")
DEFAULT_TEXT = ASSETS / "data" / "attention_text.txt"
BASE = "base"
OVERVIEW = "all_maps.png"
SUMMARY = "maps.json"
COLOUR_LABEL = "attention weight (square-root colour scale)"
TICK_LABELS_UP_TO = 48  # tokens: beyond this, tick labels are unreadable


def attention_maps(
    checkpoint: str = typer.Argument(..., help="A Nexus checkpoint: a local folder (or a Hub id)."),
    text: Path = typer.Option(
        None,
        "--text",
        help="UTF-8 text file to run (default: a short English text shipped with the package).",
    ),
    base: str = typer.Option(
        None,
        "--base",
        help="Base model for the base map (folder or Hub id); default: the checkpoint's recorded "
        "base_model when it is a local folder here, else no base map.",
    ),
    output_dir: Path = typer.Option(
        None,
        "--output-dir",
        help="Where to write the PNGs and maps.json (default: runs/attention-maps/<checkpoint name>).",
    ),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 or auto."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace maps written earlier in --output-dir."
    ),
) -> None:
    """Draw the average attention maps (outer, each inner Nexus attention, the base model's) as PNGs."""
    from ..attention_maps import OUTER, map_kinds
    from ..checkpoint import torch_dtype
    from ..modeling import NexusConfig
    from ..safe_output import OutputError, check_output_files, sigterm_as_interrupt, writing_files

    try:  # every cheap check first: nothing is loaded or written before these pass
        torch_dtype(dtype)
        config = _checkpoint_config(checkpoint)
        nexus = NexusConfig.from_saved(config["nexus"])
        words, text_source = _read_text(text)
        base_source, base_config, base_note = _base_source(checkpoint, config, base)
        sources = {
            OUTER: (checkpoint, config),
            **({BASE: (base_source, base_config)} if base_source else {}),
        }
        output_dir = output_dir if output_dir is not None else DEFAULT_ROOT / _stem(checkpoint)
        kinds = [k.name for k in map_kinds(nexus)] + ([BASE] if base_source else [])
        names = [f"{k}.png" for k in kinds] + [OVERVIEW, SUMMARY]
        check_output_files(output_dir, names, overwrite)
    except (ValueError, OSError) as e:
        raise fail(one_line(e)) from None

    try:
        with writing_files(output_dir, names, overwrite, "attention-maps") as out, sigterm_as_interrupt():
            try:
                result = _capture(checkpoint, sources, words, dtype, device)
            except (ValueError, OSError) as e:
                raise fail(one_line(e)) from None
            maps, tokens = result["maps"], result["tokens"]
            for name in kinds:
                _save(_figure(maps[name], tokens), out / f"{name}.png")
            _save(_overview([maps[k] for k in sorted(kinds, key=lambda k: k != BASE)]), out / OVERVIEW)
            summary = _summary(checkpoint, base_source, base_note, text_source, words, result, kinds, nexus)
            _write_json(out / SUMMARY, summary)
    except OutputError as e:
        raise fail(str(e)) from None
    _print_summary(summary, out)
    if base_note:
        console.print(f"[yellow]note:[/] {base_note}")


# ------------------------------------------------------------------------------------------ inputs
def _stem(checkpoint: str) -> str:
    return Path(checkpoint.rstrip("/")).name or "checkpoint"


def _checkpoint_config(checkpoint: str) -> dict:
    """CKPT's config.json; refused in one line unless it is a Nexus checkpoint of a supported family."""
    from ..checkpoint import read_source_config
    from ..families import FAMILIES

    config = read_source_config(checkpoint)
    if config.get("nexus") is None:
        raise ValueError(
            f"{checkpoint} is not a Nexus checkpoint (its config.json has no nexus block): convert it first "
            f"(nexus-retrofit convert {checkpoint} OUT) and draw the maps of OUT"
        )
    family = str(config.get("model_type", "")).removeprefix("nexus_")
    if family not in FAMILIES:
        raise ValueError(
            f"{checkpoint}: model_type {config.get('model_type')!r} is not a Nexus model type "
            f"({', '.join('nexus_' + f for f in FAMILIES)})"
        )
    return config


def _read_text(path: Path | None) -> tuple[str, str]:
    """(text, where it came from): --text FILE as UTF-8, else the shipped default; stripped, non-empty."""
    source = Path(path) if path is not None else DEFAULT_TEXT
    shown = str(path) if path is not None else f"the shipped text ({DEFAULT_TEXT.name})"
    if not source.is_file():
        why = "is a folder" if source.is_dir() else "does not exist"
        raise ValueError(f"--text {source} {why}; give a UTF-8 text file")
    try:
        text = source.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"--text {path} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8"
        ) from None
    if not text:
        raise ValueError(f"--text {path} is empty; give a file with some text")
    return text, shown


def _base_source(
    checkpoint: str, config: dict, explicit: str | None
) -> tuple[str | None, dict | None, str | None]:
    """(the base model to draw and its config.json, or None; a note when there is none). --base wins;
    else the recorded base_model when it is a local folder. The base must be the same family with the
    same vocabulary (it reads CKPT's token ids)."""
    from ..checkpoint import read_source_config

    recorded = config.get("base_model")
    if explicit is None:
        if not recorded or not (Path(recorded).expanduser() / "config.json").is_file():
            what = f"records base_model={recorded!r}, not a local model folder here" if recorded else (
                "records no base_model"
            )  # fmt: skip
            return None, None, f"no base map: {checkpoint} {what}; pass --base MODEL to draw one"
        source, flag = recorded, f"{checkpoint}'s recorded base_model"
    else:
        source, flag = explicit, "--base"
    base = read_source_config(source)
    family = str(config.get("model_type")).removeprefix("nexus_")
    if base.get("nexus") is not None:
        raise ValueError(f"{flag} {source} is a Nexus checkpoint; give the base model it was converted from")
    if base.get("model_type") != family or base.get("vocab_size") != config.get("vocab_size"):
        raise ValueError(
            f"{flag} {source} is a {base.get('model_type')!r} model with vocab_size {base.get('vocab_size')}, "
            f"{checkpoint} a {family!r} one with {config.get('vocab_size')}: the base map needs the model "
            "CKPT was converted from (same family and tokenizer)"
        )
    return source, base, None


def _capture(
    checkpoint: str, sources: dict[str, tuple[str, dict]], text: str, dtype: str, device: str | None
) -> dict[str, Any]:
    """Tokenize with CKPT's tokenizer, check the length against every model's positions (from its
    config.json, before any weights are loaded), then capture the maps: `sources` is {role: (model,
    its config)}, the outer (CKPT) and, when drawn, the base."""
    import torch
    from transformers import AutoTokenizer

    from ..attention_maps import OUTER, capture_attention_maps
    from ..checkpoint import load_causal_lm

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{checkpoint} has no usable tokenizer ({one_line(e, 160)}); copy the base model's tokenizer "
            "files into it"
        ) from None
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError("the text gives no tokens; give a longer --text")
    for source, config in sources.values():
        limit = config.get("max_position_embeddings")
        if isinstance(limit, int) and ids.shape[1] > limit:
            raise ValueError(
                f"the text is {ids.shape[1]} tokens and {source} has {limit} positions "
                "(max_position_embeddings); give a shorter --text"
            )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    maps = {}
    for role, (source, _) in sources.items():
        with console.status(f"loading {source} ..."):
            model = load_causal_lm(source, dtype).to(device)
        with console.status(f"capturing the attention maps of {source} ..."):
            captured = capture_attention_maps(model, ids)
        if role == BASE:
            maps[BASE] = replace(captured[OUTER], name=BASE, title=f"base model attention ({_stem(source)})")
        else:
            maps.update(captured)
        del model
    tokens = [tokenizer.decode([i]) for i in ids[0].tolist()]
    return {"maps": maps, "tokens": tokens, "dtype": dtype, "device": device}


# ------------------------------------------------------------------------------------------ figures
def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    return plt


def _causal(weights: np.ndarray) -> np.ndarray:
    """The map with its upper triangle masked (drawn blank: causal, never attended)."""
    import numpy as np

    return np.ma.masked_where(np.triu(np.ones(weights.shape, dtype=bool), k=1), weights)


def _norm(top: float) -> PowerNorm:
    """A square-root colour scale: the first rows (weight 1 on few keys) would leave the rest dark on
    a linear one."""
    from matplotlib.colors import PowerNorm

    return PowerNorm(gamma=0.5, vmin=0.0, vmax=max(float(top), 1e-12))


def _averaged_over(m: AttentionMap) -> str:
    return f"mean over {m.layers} layers x {m.heads} heads x {m.texts} text"


def _figure(m: AttentionMap, tokens: list[str]) -> Figure:
    plt = _pyplot()
    n = m.weights.shape[0]
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    image = ax.imshow(
        _causal(m.weights), cmap="viridis", norm=_norm(m.weights.max()), interpolation="nearest"
    )
    fig.colorbar(image, ax=ax, label=COLOUR_LABEL)
    ax.set_title(f"{m.title}\n{_averaged_over(m)}, {n} tokens", fontsize=10)
    ax.set_xlabel("key position (attended to)")
    ax.set_ylabel("query position")
    if n <= TICK_LABELS_UP_TO:
        labels = [t if t.strip() else repr(t) for t in tokens]  # whitespace tokens: visible
        ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n), labels, fontsize=6)
    fig.tight_layout()
    return fig


def _overview(maps: list[AttentionMap]) -> Figure:
    """Every map side by side on one colour scale, as the paper's Figure 2."""
    plt = _pyplot()
    cols = min(4, len(maps))
    rows = -(-len(maps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    top = max(float(m.weights.max()) for m in maps)
    for ax, m in zip(axes.flat, maps):
        image = ax.imshow(_causal(m.weights), cmap="viridis", norm=_norm(top), interpolation="nearest")
        ax.set_title(m.title.split(":")[0], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(maps) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label=COLOUR_LABEL)
    fig.suptitle(f"average attention maps ({maps[0].weights.shape[0]} tokens; one colour scale)", fontsize=10)
    return fig


def _save(fig: Figure, path: Path) -> None:
    from ..safe_output import save_figure

    save_figure(fig, path, dpi=120, bbox_inches="tight")


# ------------------------------------------------------------------------------------------ summary
def _fingerprint(source: str) -> dict[str, Any]:
    from ..evaluation.provenance import hub_fingerprint, local_fingerprint

    folder = Path(source).expanduser()
    return local_fingerprint(folder) if folder.is_dir() else hub_fingerprint(source, None)


def _map_stats(m: AttentionMap, outer: np.ndarray) -> dict[str, Any]:
    """Numbers that are linear in the map, so they mean the same on the average as on each map."""
    import numpy as np

    n = m.weights.shape[0]
    distance = np.arange(n)[:, None] - np.arange(n)[None, :]
    return {
        "shape": list(m.weights.shape),
        "layers": m.layers,
        "heads": m.heads,
        "texts": m.texts,
        "mean_distance": round(float((m.weights * distance).sum(axis=1).mean()), 4),  # tokens back
        "diagonal_mass": round(float(np.diag(m.weights).mean()), 4),  # on the token itself
        "first_token_mass": round(float(m.weights[1:, 0].mean()), 4) if n > 1 else 1.0,
        "max_abs_diff_vs_outer": float(np.abs(m.weights - outer).max()),
    }


def _summary(
    checkpoint: str,
    base_source: str | None,
    base_note: str | None,
    text_source: str,
    text: str,
    result: dict[str, Any],
    kinds: list[str],
    nexus: Any,
) -> dict[str, Any]:
    import torch
    import transformers

    from ..attention_maps import IMPLEMENTATION, OUTER

    maps = result["maps"]
    outer = maps[OUTER].weights
    return {
        "checkpoint": {"path": checkpoint, "fingerprint": _fingerprint(checkpoint), "nexus": nexus.to_dict()},
        "base": None
        if base_source is None
        else {"path": base_source, "fingerprint": _fingerprint(base_source)},
        "base_note": base_note,
        "text": {
            "source": text_source,
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "characters": len(text),
            "tokens": len(result["tokens"]),
        },
        "attention": f"{IMPLEMENTATION}: the family's eager attention through transformers' dispatch",
        "dtype": result["dtype"],
        "device": result["device"],
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "maps": [
            {"name": k, "title": maps[k].title, "file": f"{k}.png", **_map_stats(maps[k], outer)}
            for k in kinds
        ],
        "overview": OVERVIEW,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from ..safe_output import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    table = Table(title=f"attention maps, {summary['text']['tokens']} tokens ({out})")
    for column in ("map", "mean distance", "diagonal", "first token", "max |Δ| vs outer"):
        table.add_column(column)
    for m in summary["maps"]:
        table.add_row(
            m["name"],
            f"{m['mean_distance']:.2f}",
            f"{m['diagonal_mass']:.3f}",
            f"{m['first_token_mass']:.3f}",
            f"{m['max_abs_diff_vs_outer']:.2e}",
        )
    console.print(table)
    console.print(f"[green]wrote[/] {len(summary['maps']) + 1} PNGs and {SUMMARY} in {out}")
