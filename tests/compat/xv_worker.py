"""One side of the cross-version checkpoint test, run by the Python of another environment.

    python xv_worker.py write OUT     # convert tiny models, save them, record the writer's outputs
    python xv_worker.py read CKPTS    # load them WITHOUT nexus_retrofit (bundled code), compare; JSON out

The reader blocks `import nexus_retrofit`, so what runs is the modeling code bundled in the checkpoint
on the reader's transformers, as on a user's machine that only has transformers.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

VARIANTS = {  # name: (family, NexusConfig kwargs)
    "qwen2-separate-m2-qk": ("qwen2", dict(order=2, inner="separate", projections="qk")),
    "llama-shared-m3-qk": ("llama", dict(order=3, inner="shared", projections="qk")),
    "qwen3-self-m2-qkv": ("qwen3", dict(order=2, inner="self", projections="qkv")),
    "gpt_neox-separate-m2-qkv": ("gpt_neox", dict(order=2, inner="separate", projections="qkv")),
    "gpt_neox_sequential-shared-m3-qk": (
        "gpt_neox_sequential",
        dict(order=3, inner="shared", projections="qk"),
    ),
}
NEW_TOKENS = 6


def _inputs():
    import torch

    ids = torch.tensor([[0, 0, 0, 7, 8, 9, 10, 11], [3, 4, 5, 6, 7, 8, 9, 10]])
    return ids, (ids != 0).long()


def _cache_kwargs(model, cache) -> dict:
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    return {name: cache}


def _outputs(model) -> dict:
    """Full-forward logits, incremental (cached) logits and greedy tokens on a left-padded batch."""
    import torch
    from transformers.cache_utils import DynamicCache

    ids, mask = _inputs()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache, prefix = DynamicCache(config=model.config), 3
        steps = [
            model(
                ids[:, :prefix],
                attention_mask=mask[:, :prefix],
                use_cache=True,
                **_cache_kwargs(model, cache),
            ).logits
        ]
        for t in range(prefix, ids.shape[1]):
            step = model(
                ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                use_cache=True,
                **_cache_kwargs(model, cache),
            )
            steps.append(step.logits)
        greedy = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    return {"full": full, "incremental": torch.cat(steps, dim=1), "greedy": greedy, "mask": mask}


def write(out: Path) -> None:
    import torch
    import transformers
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    from nexus_retrofit import NexusConfig, convert

    gqa = {"num_key_value_heads": 2}
    pythia = {
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    }
    families = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, gqa),
        "llama": (LlamaConfig, LlamaForCausalLM, gqa),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16, **gqa}),
        "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM, {"use_parallel_residual": True, **pythia}),
        "gpt_neox_sequential": (
            GPTNeoXConfig,
            GPTNeoXForCausalLM,
            {"use_parallel_residual": False, **pythia},
        ),
    }
    for name, (family, settings) in VARIANTS.items():
        config_cls, model_cls, extra = families[family]
        config = config_cls(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=101,
            max_position_embeddings=128,
            pad_token_id=0,
            **extra,
        )
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        model = convert(model_cls(config).eval(), NexusConfig(**settings))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # non-zero gates and inner weights: a zero gate hides every inner bug
            for pname, p in model.named_parameters():
                if ".gates." in pname:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
                elif ".inner." in pname:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.1)
        model.save_pretrained(out / name)
        torch.save(_outputs(model), out / name / "writer_outputs.pt")
    (out / "writer.json").write_text(json.dumps({"transformers": transformers.__version__}))


def read(ckpts: Path) -> None:
    sys.modules["nexus_retrofit"] = None  # as on a machine without the package
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    report = {"reader": transformers.__version__, **json.loads((ckpts / "writer.json").read_text())}
    for name in VARIANTS:
        model = AutoModelForCausalLM.from_pretrained(
            ckpts / name, trust_remote_code=True, attn_implementation="eager"
        ).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        mine, theirs = _outputs(model), torch.load(ckpts / name / "writer_outputs.pt")
        valid = mine["mask"].bool()
        report[name] = {
            "full_vs_writer": (mine["full"] - theirs["full"])[valid].abs().max().item(),
            "incremental_vs_full": (mine["incremental"] - mine["full"])[valid].abs().max().item(),
            "greedy_equal": bool(torch.equal(mine["greedy"], theirs["greedy"])),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    {"write": write, "read": read}[sys.argv[1]](Path(sys.argv[2]))
