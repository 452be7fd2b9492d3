"""Nexus attention: function preservation, cache, padding, attention backends, parameters, gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.cache_utils import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from nexus_retrofit import NexusConfig, convert
from nexus_retrofit.modeling import modeling_nexus
from tests.conftest import (
    FAMILIES,
    attention_of,
    decoder_layers,
    is_output_projection,
    perturb_nexus,
    tiny_base_model,
)

INNERS = ("separate", "shared", "self")
PROJECTIONS = ("q", "k", "v", "qk", "qv", "kv", "qkv")


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


# 1. gate="zero": the converted model computes exactly what the source computed ----------------
ZERO_GATE_CASES = [
    pytest.param(family, inner, order, proj, id=f"{family}-{inner}-m{order}-{proj}")
    for family in FAMILIES
    for inner in INNERS
    for order in (1, 2, 3)
    for proj in PROJECTIONS
] + [  # the token-wise control (one level)
    pytest.param(family, "mlp", 2, proj, id=f"{family}-mlp-m2-{proj}")
    for family in FAMILIES
    for proj in ("qk", "qkv")
]


@pytest.mark.parametrize("family,inner,order,proj", ZERO_GATE_CASES)
def test_zero_gate_preserves_logits(family, inner, order, proj, ids):
    base = tiny_base_model(family)
    ref = _logits(base, ids)
    model = convert(base, NexusConfig(order=order, projections=proj, inner=inner, gate="zero"))
    assert (_logits(model, ids) - ref).abs().max().item() <= 1e-5


# 2. gate="none" is the paper's form: it changes the function --------------------------------
@pytest.mark.parametrize("inner,order", [(i, m) for i in INNERS for m in (2, 3)] + [("mlp", 2)])
def test_gate_none_changes_logits(inner, order, ids):
    base = tiny_base_model("qwen2")
    ref = _logits(base, ids)
    model = convert(base, NexusConfig(order=order, inner=inner, gate="none"))
    assert (_logits(model, ids) - ref).abs().max().item() > 1e-3


def test_nonzero_gate_changes_logits(ids):
    base = tiny_base_model("llama")
    ref = _logits(base, ids)
    model = convert(base, NexusConfig(order=2, inner="separate"))
    perturb_nexus(model)
    assert (_logits(model, ids) - ref).abs().max().item() > 1e-3


# 3. cache: incremental decoding == one full pass, also with left padding ----------------------
CACHE_CASES = [
    pytest.param(family, inner, order, proj, gate, id=f"{family}-{inner}-m{order}-{proj}-{gate}")
    for family, inner, order, proj, gate in [
        *[("qwen2", inner, order, "qk", "zero") for inner in INNERS for order in (2, 3)],
        *[("llama", inner, 2, "qkv", "zero") for inner in INNERS],
        ("llama", "self", 3, "q", "none"),
        ("qwen3", "separate", 2, "qk", "zero"),
        ("mistral", "shared", 3, "qkv", "none"),
        ("gpt_neox", "separate", 3, "qkv", "none"),
        ("gpt_neox", "shared", 2, "qk", "none"),
        ("gpt_neox_sequential", "self", 2, "qkv", "zero"),
        ("gpt_neox_sequential", "separate", 2, "qk", "zero"),
        ("qwen2", "mlp", 2, "qk", "none"),
        ("gpt_neox", "mlp", 2, "qkv", "zero"),
    ]
]


def _nexus_model(family, inner, order, proj, gate, attn="eager"):
    model = convert(
        tiny_base_model(family, attn=attn), NexusConfig(order=order, projections=proj, inner=inner, gate=gate)
    )
    perturb_nexus(model)
    return model


@pytest.mark.parametrize("family,inner,order,proj,gate", CACHE_CASES)
def test_incremental_decoding_matches_full_forward(family, inner, order, proj, gate):
    model = _nexus_model(family, inner, order, proj, gate)
    torch.manual_seed(5)
    ids = torch.randint(1, 101, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :6] = 0
    ids = ids.masked_fill(mask == 0, 0)
    full = _logits(model, ids, attention_mask=mask)

    cache = DynamicCache(config=model.config)  # what generate() creates: exactly num_hidden_layers layers
    prefix = 4
    steps = [
        _logits(
            model, ids[:, :prefix], attention_mask=mask[:, :prefix], past_key_values=cache, use_cache=True
        )
    ]
    for t in range(prefix, ids.shape[1]):
        steps.append(
            _logits(
                model,
                ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                past_key_values=cache,
                use_cache=True,
            )
        )
    incremental = torch.cat(steps, dim=1)
    valid = mask.bool()
    assert torch.isfinite(full).all() and torch.isfinite(incremental).all()
    assert (incremental - full)[valid].abs().max().item() <= 1e-4
    levels = 0 if inner == "mlp" else order - 1  # the token-wise control caches nothing of its own
    assert len(cache.layers) == model.config.num_hidden_layers * (1 + levels)


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("order", (2, 3))
def test_greedy_generate_same_tokens_with_and_without_cache(inner, order):
    model = _nexus_model("qwen2", inner, order, "qk", "zero")
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([[0, 0, 5, 7, 9, 11], [3, 4, 5, 6, 7, 8]])
    mask = (ids != 0).long()
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_padding_rows_stay_finite():
    model = _nexus_model("qwen2", "self", 3, "qkv", "none", attn="sdpa")
    ids = torch.tensor([[0, 0, 0, 0, 5, 6], [1, 2, 3, 4, 5, 6]])
    hidden = []
    model.model.layers[-1].register_forward_hook(
        lambda m, i, o: hidden.append(o[0] if isinstance(o, tuple) else o)
    )
    _logits(model, ids, attention_mask=(ids != 0).long())
    assert torch.isfinite(hidden[0]).all()


def test_static_cache_is_refused_clearly():
    model = _nexus_model("qwen2", "separate", 2, "qk", "zero")
    with pytest.raises(NotImplementedError, match="DynamicCache"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, cache_implementation="static")


# 5. eager == sdpa, and sdpa materialises no n x n matrix -------------------------------------
@pytest.mark.parametrize("inner,order,proj", [(i, o, p) for i in INNERS for o, p in ((2, "qk"), (3, "qkv"))])
def test_eager_and_sdpa_agree(inner, order, proj):
    eager = _nexus_model("qwen2", inner, order, proj, "zero", attn="eager")
    sdpa = _nexus_model("qwen2", inner, order, proj, "zero", attn="sdpa")
    ids = torch.tensor([[0, 0, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8]])
    mask = (ids != 0).long()
    diff = (_logits(eager, ids, attention_mask=mask) - _logits(sdpa, ids, attention_mask=mask))[mask.bool()]
    assert diff.abs().max().item() <= 1e-5


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("inner", INNERS)
def test_sdpa_path_never_materialises_n_by_n(inner, monkeypatch):
    model = _nexus_model("qwen2", inner, 3, "qkv", "zero", attn="sdpa")
    calls = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def counting_sdpa(*args, **kwargs):
        calls.append(args[1].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", counting_sdpa)
    n = 37  # distinct from every model dimension
    ids = torch.randint(1, 101, (1, n))
    with torch.no_grad(), _ShapeRecorder() as rec:
        model(ids)
    square = [(op, s) for op, s in rec.shapes if len(s) >= 2 and s[-2:] == (n, n)]
    assert not square, f"n x n tensors materialised: {square[:3]}"
    # every sub-attention went through the dispatch: one fused call per level + the outer, per layer
    assert len(calls) == model.config.num_hidden_layers * 3


# 4. parameter counts --------------------------------------------------------------------------
def _added(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".inner." in n or ".gates." in n)


def _attention_params(model) -> int:
    return sum(
        p.numel() for p in model.model.layers[0].self_attn.base_attention_class(model.config, 0).parameters()
    )


@pytest.mark.parametrize("proj", ("q", "qk", "qkv"))
def test_parameter_counts(proj):
    cfg = tiny_base_model("qwen2").config
    hidden, layers, heads, kv, hd = cfg.hidden_size, cfg.num_hidden_layers, 4, 2, 16
    width = {"q": heads * hd, "k": kv * hd, "v": kv * hd}
    counts = {}
    for inner, gate, order in itertools.product(INNERS, ("zero", "none"), (2, 3)):
        model = convert(
            tiny_base_model("qwen2"), NexusConfig(order=order, projections=proj, inner=inner, gate=gate)
        )
        counts[inner, gate, order] = _added(model)
        gates = (
            0
            if gate == "none"
            else (sum(width[p] for p in proj) if inner == "self" else hidden * len(proj)) * layers
        )
        modules = len(proj) * layers * _attention_params(model) if inner == "separate" else 0
        assert counts[inner, gate, order] == gates + modules, (inner, gate, order)
    for inner, gate in itertools.product(INNERS, ("zero", "none")):
        assert counts[inner, gate, 2] == counts[inner, gate, 3]  # weights shared across levels (Sec. 3.4)
    assert counts["shared", "none", 2] == counts["self", "none", 2] == 0


def test_order_one_adds_nothing(ids):
    model = convert(tiny_base_model("qwen2"), NexusConfig(order=1))
    assert _added(model) == 0


# 6. training signal --------------------------------------------------------------------------
@pytest.mark.parametrize("inner", INNERS)
def test_one_step_moves_gates_then_inner_weights(inner):
    settings = NexusConfig(order=2, inner=inner, gate="zero", inner_init="random")
    model = convert(tiny_base_model("qwen2"), settings).train()
    gates = {n: p for n, p in model.named_parameters() if ".gates." in n}
    inner_w = {
        n: p for n, p in model.named_parameters() if ".inner." in n or n.endswith("self_attn.q_proj.weight")
    }
    snapshot = lambda ps: {n: p.detach().clone() for n, p in ps.items()}  # noqa: E731
    # Adam with a negligible eps: updates follow the sign of the gradient, so a gradient that is
    # exactly zero (inner weights behind g = 0) gives no update, and a tiny non-zero one does.
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-30)
    torch.manual_seed(0)
    batch = torch.randint(1, 101, (4, 16))

    def step():
        opt.zero_grad()
        model(batch, labels=batch).loss.backward()
        opt.step()

    g0, w0 = snapshot(gates), snapshot(inner_w)
    step()
    assert all(not torch.equal(g0[n], p) for n, p in gates.items()), "a gate did not move"
    if inner == "separate":  # with g = 0 the inner modules get no gradient on the first step
        assert all(torch.equal(w0[n], p) for n, p in inner_w.items() if ".inner." in n)
    w1 = snapshot(inner_w)
    step()
    changed = [n for n, p in inner_w.items() if not torch.equal(w1[n], p)]
    assert changed and all(
        not torch.equal(w1[n], p) for n, p in inner_w.items() if ".inner." in n and "weight" in n
    )


def test_gradient_checkpointing_matches(ids):
    model = _nexus_model("qwen2", "separate", 3, "qk", "zero").train()
    model.config.use_cache = False
    loss = model(ids, labels=ids).loss
    grads = torch.autograd.grad(loss, [p for n, p in model.named_parameters() if ".gates." in n])
    model.gradient_checkpointing_enable()
    loss_ckpt = model(ids, labels=ids).loss
    grads_ckpt = torch.autograd.grad(loss_ckpt, [p for n, p in model.named_parameters() if ".gates." in n])
    assert torch.allclose(loss, loss_ckpt)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_ckpt))


# 7. fused projections: one matmul per level, exactly the per-module computation ---------------
def _hook_projections(model, names=("q_proj", "k_proj", "v_proj", "query_key_value")) -> list[str]:
    """A forward hook on every q/k/v projection: hooked modules are never fused. Returns call log."""
    calls: list[str] = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in names:
            module.register_forward_hook(lambda mod, args, out, name=name: calls.append(name))
    return calls


FUSION_CASES = [
    pytest.param(family, inner, order, proj, id=f"{family}-{inner}-m{order}-{proj}")
    for family in FAMILIES
    for inner in INNERS
    for order, proj in ((2, "qk"), (3, "qkv"))
]


@pytest.mark.parametrize("family,inner,order,proj", FUSION_CASES)
def test_fused_projections_equal_separate_module_calls(family, inner, order, proj, ids):
    model = _nexus_model(family, inner, order, proj, "zero")
    perturb_nexus(model)  # a zero gate would hide the inner projections
    fused = _logits(model, ids)
    calls = _hook_projections(model)
    unfused = _logits(model, ids)
    assert calls, "hooks must force the per-module path"
    assert (fused - unfused).abs().max().item() <= 1e-5


def test_peft_lora_on_an_inner_projection_is_not_bypassed(ids):
    from peft import LoraConfig, get_peft_model

    model = _nexus_model("qwen2", "separate", 2, "qk", "zero")
    before = _logits(model, ids)
    lora = get_peft_model(
        model, LoraConfig(r=4, target_modules=r".*\.inner\.q\.q_proj", init_lora_weights=False)
    )
    assert (_logits(lora, ids) - before).abs().max().item() > 1e-4  # the adapter is in the forward pass


@pytest.mark.parametrize(
    "inner,module", [("shared", "self_attn.v_proj"), ("separate", "self_attn.inner.q.v_proj")]
)
def test_an_unrefined_projection_runs_once_per_layer_at_every_order(inner, module):
    model = _nexus_model("qwen2", inner, 3, "qk", "zero")
    calls = _hook_projections(model, names=("v_proj",))
    with torch.no_grad():
        model(torch.randint(1, 101, (1, 9)))
    layers = model.config.num_hidden_layers
    assert sum(c.endswith(module) for c in calls) == layers  # V of X: shared by both levels (and the outer)


# 9. model classes: each Nexus attention is built once, before the one init pass -----------------
MODEL_CLASS_CASES = [
    pytest.param(family, bare, id=f"{family}-{'Model' if bare else 'ForCausalLM'}")
    for family in FAMILIES
    for bare in (False, True)
]


@pytest.mark.parametrize("family,bare", MODEL_CLASS_CASES)
def test_model_class_builds_each_nexus_attention_once(family, bare, monkeypatch):
    converted = convert(tiny_base_model(family), NexusConfig(order=2, gate="open", inner_init="zero_out"))
    causal_cls = type(converted)
    model_cls = (
        getattr(modeling_nexus, causal_cls.__name__.replace("ForCausalLM", "Model")) if bare else causal_cls
    )
    attention_cls = model_cls.nexus_attention_class
    built, inits = [], []
    original_init = attention_cls.__init__
    monkeypatch.setattr(
        attention_cls, "__init__", lambda self, *a, **k: built.append(1) or original_init(self, *a, **k)
    )
    original_init_weights = model_cls.init_weights
    monkeypatch.setattr(
        model_cls, "init_weights", lambda self: inits.append(1) or original_init_weights(self)
    )

    model = model_cls(converted.config)

    layers = converted.config.num_hidden_layers
    assert len(built) == layers and len(inits) == 1
    assert all(isinstance(attention_of(layer), attention_cls) for layer in decoder_layers(model))
    weights = {name: p.detach() for name, p in model.named_parameters()}
    gates = [w for name, w in weights.items() if ".gates." in name]
    inner_out = [w for name, w in weights.items() if ".inner." in name and is_output_projection(name)]
    assert gates and all(torch.equal(g, torch.ones_like(g)) for g in gates)  # the open gate's start
    assert inner_out and all(not w.any() for w in inner_out)  # zero_out


def test_post_init_called_again_never_rebuilds_the_attention():
    model = convert(tiny_base_model("qwen2"), NexusConfig(order=2))
    attentions = [layer.self_attn for layer in model.model.layers]
    model.post_init()
    assert [layer.self_attn for layer in model.model.layers] == attentions
