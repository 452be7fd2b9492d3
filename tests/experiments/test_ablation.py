"""The `ablation` experiment (Table 2 in miniature): helpers and its --quick run on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from nexus_retrofit.experiments import ablation as A


def _tokenizer():
    from transformers import AutoTokenizer

    from nexus_retrofit.demo.assets import tiny_model_path

    try:
        return AutoTokenizer.from_pretrained(tiny_model_path())
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_encode_labels_only_the_completion():
    tok = _tokenizer()
    ids, labels = A.encode(tok, "What is 2 + 3?", "2 + 3 = 5.")
    assert len(ids) == len(labels)
    n_prompt = sum(1 for y in labels if y == -100)
    assert 0 < n_prompt < len(ids) and labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert "2 + 3 = 5." in tok.decode(ids[n_prompt:])
    x, mask, y = A.collate([(ids, labels), (ids[:5], labels[:5])], tok.pad_token_id)
    assert x.shape == y.shape == mask.shape == (2, len(ids))
    assert int(mask[1].sum()) == 5 and (y[1, 5:] == -100).all()


def test_every_nexus_row_starts_as_the_base_model():
    """Gate zero: the converted rows compute the base model's logits before SFT (a fair start)."""
    base, tok = A.load_row("baseline", 0)
    ids = tok(["Ana has 7 apples and buys 5 more."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = base(ids).logits
        for name in ("Nexus-QK", "Nexus-QK-self", "Nexus-QK order 3"):
            model, _ = A.load_row(name, 0)
            torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_quick_run_writes_sane_outputs(tmp_path):
    out = A.run(tmp_path, quick=True)
    for path in (out.json_path, out.markdown_path, out.plot_path):
        assert path.exists() and path.stat().st_size > 0
    results = json.loads(out.json_path.read_text())
    assert set(results["runs"]) == set(A.QUICK.configs)
    for runs in results["runs"].values():
        for r in runs:
            for level in ("acc_level1", "acc_level2"):  # a count of right answers out of eval_per_level
                correct = r[level] * A.QUICK.eval_per_level
                assert (
                    correct == pytest.approx(round(correct)) and 0 <= round(correct) <= A.QUICK.eval_per_level
                )
            assert 0.0 < r["heldout_loss"] < 10.0 and r["final_train_loss"] > 0
    nexus = results["runs"]["Nexus-QK"][0]
    assert nexus["parameters"] > results["runs"]["baseline"][0]["parameters"]
    assert nexus["gate_abs_mean"] > 0  # the gates moved off zero
    assert "2-step acc" in out.markdown_path.read_text()
