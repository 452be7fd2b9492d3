"""Attention maps (nexus_retrofit.attention_maps and `nexus-retrofit attention-maps`): which maps a reading
gives, that each is a causal average of softmax rows, that they are the model's own attention (equal to
transformers' output_attentions, to an independent computation of the inner level, to the base model at a
function-preserving start) and that they move when the inner path does; the command's files and refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nexus_retrofit import NexusConfig, convert
from nexus_retrofit.attention_maps import IMPLEMENTATION, capture_attention_maps, map_kinds
from nexus_retrofit.cli import app
from nexus_retrofit.demo.assets import tiny_model_path
from nexus_retrofit.modeling import NexusAttentionMixin
from tests.conftest import FAMILIES, VOCAB, perturb_nexus, tiny_base_model

runner = CliRunner()

# (inner, projections, order) -> the maps that reading implies, outer first, then the cache order
READINGS = {
    ("separate", "qk", 2): ["outer", "inner_q_level1", "inner_k_level1"],
    ("separate", "qkv", 2): ["outer", "inner_q_level1", "inner_k_level1", "inner_v_level1"],
    ("shared", "qk", 2): ["outer", "inner_level1"],
    ("self", "qk", 2): ["outer", "inner_q_level1", "inner_k_level1"],
    ("separate", "qk", 3): ["outer", "inner_q_level1", "inner_k_level1", "inner_q_level2", "inner_k_level2"],
    ("shared", "q", 3): ["outer", "inner_level1", "inner_level2"],
    ("self", "qkv", 3): ["outer"] + [f"inner_{p}_level{lv}" for lv in (1, 2) for p in "qkv"],
    ("separate", "qk", 1): ["outer"],
}
READING_IDS = [f"{inner}-{proj}-m{order}" for inner, proj, order in READINGS]
HEADS, KV_HEADS, N = 4, 2, 12  # tests/conftest.py's tiny GQA layout; tokens per text


def _ids(batch: int = 1, n: int = N, seed: int = 7) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _nexus(family="qwen2", inner="separate", proj="qk", order=2, **settings):
    settings.setdefault("gate", "zero" if inner != "separate" else None)
    return convert(
        tiny_base_model(family), NexusConfig(order=order, projections=proj, inner=inner, **settings)
    )


# 1. the set of maps, and what every map is ----------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2", "gpt_neox"])
@pytest.mark.parametrize("reading", list(READINGS), ids=READING_IDS)
def test_the_maps_are_the_readings_sub_attentions_each_a_causal_average(reading, family):
    inner, proj, order = reading
    model = _nexus(family, inner, proj, order)
    before = model.config._attn_implementation
    maps = capture_attention_maps(model, _ids(batch=2))
    assert list(maps) == READINGS[reading] == [k.name for k in map_kinds(model.config.nexus_config)]
    assert model.config._attn_implementation == before != IMPLEMENTATION  # put back
    kv = KV_HEADS if family == "qwen2" else HEADS  # GPT-NeoX: a KV head per query head
    for name, m in maps.items():
        w = m.weights
        assert w.shape == (N, N) and w.dtype == np.float64
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
        assert (w >= 0).all() and not np.triu(w, k=1).any()  # causal: exactly 0 above the diagonal
        assert w[0, 0] == pytest.approx(1.0)
        # the `self` reading's k (and v) side attends over the KV heads only
        own_heads = kv if inner == "self" and name.startswith(("inner_k", "inner_v")) else HEADS
        assert (m.layers, m.heads, m.texts) == (2, own_heads, 2), name


def test_a_base_model_gives_its_one_map():
    maps = capture_attention_maps(tiny_base_model("llama"), _ids())
    assert list(maps) == ["outer"] and maps["outer"].weights.shape == (N, N)


# 2. the maps are the model's own attention ------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(
    "reading",
    [("separate", "qk", 2), ("shared", "qk", 2), ("self", "qk", 3)],
    ids=["separate", "shared", "self"],
)
def test_the_outer_map_is_what_transformers_output_attentions_gives(family, reading):
    """A cross-check through transformers' own path: the eager model's `attentions`, averaged."""
    inner, proj, order = reading
    model = _nexus(family, inner, proj, order)
    perturb_nexus(model)  # an open path: the outer attention is not the base model's
    ids = _ids(batch=2)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    expected = torch.stack(attentions).double().mean(dim=(0, 1, 2)).numpy()
    np.testing.assert_allclose(capture_attention_maps(model, ids)["outer"].weights, expected, atol=1e-6)


def _causal_softmax(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q kᵀ s + causal mask), (B, heads, n, n); k's heads repeated to q's (GQA)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).double() * scale
    n = q.shape[-2]
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(dim=-1)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("inner", ["separate", "self"])
def test_the_level_1_maps_equal_an_independent_computation(inner, order):
    """Level 1 reads X: its maps are softmax(R(W_q X) R(W_k X)ᵀ s) of the inner modules (separate) or of
    the layer's own projected heads (self, Eq. 7-8), computed here from the attention's inputs, at any
    order. Catches a wrong split of the stacked heads (q block, then k block) or of the cache slots
    (level 2's map taken for level 1's)."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    model = _nexus("qwen2", inner, "qk", order)
    perturb_nexus(model)
    inputs = []
    for attention in (m for m in model.modules() if isinstance(m, NexusAttentionMixin)):
        attention.register_forward_pre_hook(lambda mod, a, kw: inputs.append((mod, kw)), with_kwargs=True)
    ids = _ids()
    maps = capture_attention_maps(model, ids)
    assert len(inputs) == model.config.num_hidden_layers
    expected = {"q": 0, "k": 0}
    for attention, kwargs in inputs:
        x, (cos, sin) = kwargs["hidden_states"], kwargs["position_embeddings"]
        for p in "qk":
            if inner == "separate":  # the inner module of p: its own q and k on X
                module, heads = attention.inner[p], (HEADS, KV_HEADS)
                q, k = (getattr(module, f"{s}_proj")(x) for s in "qk")
            else:  # self: p's own heads attend over themselves
                heads = (HEADS, HEADS) if p == "q" else (KV_HEADS, KV_HEADS)
                q = k = getattr(attention, f"{p}_proj")(x)
            q = q.view(1, N, heads[0], -1).transpose(1, 2)
            k = k.view(1, N, heads[1], -1).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            expected[p] = expected[p] + _causal_softmax(q, k, attention.scaling).mean(dim=(0, 1))
    for p in "qk":
        want = (expected[p] / len(inputs)).detach().numpy()
        np.testing.assert_allclose(maps[f"inner_{p}_level1"].weights, want, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt_neox"])
@pytest.mark.parametrize(
    "reading,settings",
    [
        (("separate", "qk", 2), dict(gate="zero")),
        (("separate", "qkv", 3), dict()),  # gate open, inner o_proj at 0: the default start
        (("shared", "qk", 2), dict(gate="zero")),
        (("self", "qk", 3), dict(gate="zero")),
    ],
    ids=["separate-zero", "separate-open-zero_out", "shared-zero", "self-zero"],
)
def test_a_function_preserving_start_has_the_base_models_outer_map(family, reading, settings):
    ids = _ids()
    base = capture_attention_maps(tiny_base_model(family), ids)["outer"].weights
    inner, proj, order = reading
    maps = capture_attention_maps(_nexus(family, inner, proj, order, **settings), ids)
    np.testing.assert_allclose(maps["outer"].weights, base, atol=1e-5)
    if inner == "shared":  # level 1 of `shared` is the layer's own attention on X: the base map too
        np.testing.assert_allclose(maps["inner_level1"].weights, base, atol=1e-5)


def _train(model, steps: int = 4, lr: float = 0.05) -> None:
    """A few AdamW steps on random tokens: enough to move the gates off their start."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        ids = _ids(batch=4, seed=100 + step)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize(
    "reading,settings,change",
    [
        (("shared", "qk", 2), dict(gate="zero"), "train"),
        (("shared", "qk", 2), dict(gate="none"), None),
        (("separate", "qk", 2), dict(gate="zero", inner_init="random"), "train"),
        (("separate", "qk", 2), dict(gate="none", inner_init="random"), None),
        (("self", "qk", 2), dict(gate="zero"), "train"),
    ],
    ids=["shared-trained", "shared-ungated", "separate-trained", "separate-ungated", "self-trained"],
)
def test_once_the_inner_path_is_on_the_maps_move(reading, settings, change):
    ids = _ids()
    base = capture_attention_maps(tiny_base_model("qwen2"), ids)["outer"].weights
    model = _nexus("qwen2", *reading, **settings)
    if change == "train":
        _train(model)
    maps = capture_attention_maps(model, ids)
    assert np.abs(maps["outer"].weights - base).max() > 1e-3  # the outer attention is no longer the base's
    for name, m in maps.items():
        if name != "outer":
            assert np.abs(m.weights - maps["outer"].weights).max() > 1e-3, name


def test_an_empty_text_is_refused():
    with pytest.raises(ValueError, match="n >= 1"):
        capture_attention_maps(tiny_base_model(), torch.zeros(1, 0, dtype=torch.long))


# 3. the command ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The shipped tiny model converted with the defaults (fp32): its config records the base model."""
    out = tmp_path_factory.mktemp("maps") / "nexus"
    result = runner.invoke(app, ["convert", str(tiny_model_path()), str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    return out


def _outputs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.exists() else set()


def test_the_command_writes_one_png_per_map_and_maps_json(checkpoint, tmp_path):
    out = tmp_path / "maps"
    text = tmp_path / "text.txt"
    text.write_text("Tom has 3 apples. He gives 1 apple to Ann. How many apples does Tom have?\n")
    result = runner.invoke(
        app, ["attention-maps", str(checkpoint), "--text", str(text), "--output-dir", str(out)]
    )
    assert result.exit_code == 0, result.output
    names = ["outer", "inner_q_level1", "inner_k_level1", "base"]
    assert _outputs(out) == {f"{n}.png" for n in names} | {"all_maps.png", "maps.json"}
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "maps.json").read_text())
    tokens = summary["text"]["tokens"]
    assert tokens > 10 and summary["text"]["source"] == str(text)
    assert [m["name"] for m in summary["maps"]] == names
    assert all(m["shape"] == [tokens, tokens] and m["file"] == f"{m['name']}.png" for m in summary["maps"])
    by_name = {m["name"]: m for m in summary["maps"]}
    assert by_name["base"]["max_abs_diff_vs_outer"] <= 1e-5  # the converted model starts as its base
    assert by_name["inner_q_level1"]["max_abs_diff_vs_outer"] > 1e-3
    assert summary["base"]["path"] == str(tiny_model_path()) and summary["base_note"] is None
    assert summary["checkpoint"]["fingerprint"]["kind"] == "local"
    assert summary["checkpoint"]["nexus"]["inner"] == "separate"


def test_without_a_local_base_the_base_map_is_left_out_with_a_note(checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["base_model"] = "some-org/not-here"
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "maps"
    result = runner.invoke(app, ["attention-maps", str(ckpt), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "no base map" in result.output and "--base" in result.output
    assert _outputs(out) == {
        "outer.png",
        "inner_q_level1.png",
        "inner_k_level1.png",
        "all_maps.png",
        "maps.json",
    }
    summary = json.loads((out / "maps.json").read_text())
    assert summary["base"] is None and "some-org/not-here" in summary["base_note"]
    assert summary["text"]["source"].startswith("the shipped text")
    again = runner.invoke(
        app, ["attention-maps", str(ckpt), "--output-dir", str(out), "--base", str(tiny_model_path())]
    )
    assert again.exit_code != 0 and "--overwrite" in again.output  # its own files: replaced on request only


def _bad_inputs(checkpoint: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "empty.txt").write_text(" \n")
    (tmp / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp / "long.txt").write_text("1 " * 1100)  # tiny-qwen2 has 1024 positions
    other = tmp / "other-base"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 7}))
    untokenized = tmp / "no-tokenizer"
    shutil.copytree(checkpoint, untokenized, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    c = str(checkpoint)
    return {
        "base checkpoint": ([str(tiny_model_path())], "is not a Nexus checkpoint"),
        "missing checkpoint": ([str(tmp / "nope")], "no such local folder"),
        "missing text": ([c, "--text", str(tmp / "nope.txt")], "does not exist"),
        "empty text": ([c, "--text", str(tmp / "empty.txt")], "is empty"),
        "not utf-8": ([c, "--text", str(tmp / "latin1.txt")], "not UTF-8"),
        "too long": ([c, "--text", str(tmp / "long.txt")], "positions"),
        "other vocabulary": ([c, "--base", str(other)], "same family and tokenizer"),
        "nexus base": ([c, "--base", c], "is a Nexus checkpoint"),
        "bad dtype": ([c, "--dtype", "int8"], "--dtype"),
        "no tokenizer": ([str(untokenized)], "no usable tokenizer"),
    }


@pytest.mark.parametrize(
    "case",
    ["base checkpoint", "missing checkpoint", "missing text", "empty text", "not utf-8", "too long",
     "other vocabulary", "nexus base", "bad dtype", "no tokenizer"],
)  # fmt: skip
def test_bad_input_is_one_line_before_any_write(case, checkpoint, tmp_path):
    argv, message = _bad_inputs(checkpoint, tmp_path)[case]
    out = tmp_path / "maps"
    result = runner.invoke(app, ["attention-maps", *argv, "--output-dir", str(out)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()
