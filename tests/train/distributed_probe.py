"""`accelerate launch` target for test_fsdp.py and test_deepspeed.py: `nexus-retrofit train` with a
probe on the trainer.

The probe records, at the end of training and before the final save, what the wrapped model (FSDP or
a DeepSpeed engine) holds: its full state dict gathered on rank 0, its logits on a fixed batch (a
forward pass of the sharded model, which every rank joins), this rank's share of the weights, and
how often the Nexus attention fused its projections into one matmul. The test compares the saved
checkpoint with all of it. Run as `python distributed_probe.py PROBE_DIR RECIPE [--key value ...]`.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import torch
from transformers import TrainerCallback

from nexus_retrofit.modeling import modeling_nexus
from nexus_retrofit.train import run_training
from nexus_retrofit.train import trainer as trainer_module

PROBE_IDS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
FUSABLE: Counter = Counter()  # modeling_nexus._fusable's answers during training: {True: n, False: n}


def count_fusable() -> None:
    fusable = modeling_nexus._fusable

    def counted(linear: torch.nn.Module) -> bool:
        FUSABLE[answer := fusable(linear)] += 1
        return answer

    modeling_nexus._fusable = counted


def local_numel(model: torch.nn.Module) -> int:
    """This rank's share of the weights: ZeRO-3 keeps it in `ds_tensor` (the parameter itself is empty)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


class Probe(TrainerCallback):
    def __init__(self, trainer, folder: Path):
        self.trainer, self.folder = trainer, folder

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        model = trainer.model_wrapped
        full = trainer.accelerator.get_state_dict(model)  # collective: every rank joins
        model.eval()
        fusable = dict(FUSABLE)  # during training, before the probe's own forward
        with torch.no_grad():
            logits = model(input_ids=PROBE_IDS).logits  # collective too (FSDP gathers each unit)
        local = local_numel(model)
        if trainer.accelerator.is_main_process:
            torch.save(
                {
                    "state_dict": {k: v.detach().cpu().clone() for k, v in full.items()},
                    "logits": logits.cpu(),
                    "ids": PROBE_IDS,
                    "wrapper": type(model).__name__,
                    "is_fsdp_enabled": trainer.is_fsdp_enabled,
                    "is_deepspeed_enabled": trainer.is_deepspeed_enabled,
                    "local_numel": local,
                    "fusable": fusable,
                },
                self.folder / "probe.pt",
            )
        model.train()


def check_saved_against_probe(probe_dir: Path, out: Path, start: Path) -> None:
    """The test side: the run in `out` finished, saved exactly the state dict the wrapped trainer held
    (gathered by the probe), moved most of the `start` weights and the gates, and the saved model
    loaded by plain transformers gives the logits the sharded model gave."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert json.loads((out / "nexus_train_run.json").read_text())["complete"] is True
    probe = torch.load(probe_dir / "probe.pt", weights_only=False)
    saved = load_file(out / "model.safetensors")
    held = probe["state_dict"]
    assert set(held) - set(saved) <= {"lm_head.weight"}, "only the tied output weight is left out of the file"
    assert all(torch.equal(saved[k], held[k]) for k in saved)
    before = load_file(start / "model.safetensors")
    moved = [k for k in before if not torch.equal(before[k], saved[k])]
    assert len(moved) > len(before) // 2, "the weights trained"
    assert any(".self_attn.gates." in k and not torch.equal(v, torch.ones_like(v)) for k, v in saved.items())

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["ids"]).logits
    assert (logits - probe["logits"]).abs().max().item() < 1e-4


def fsdp_on_cpu() -> None:
    """Let accelerate use its FSDP plugin on CPU ranks (gloo), which it does not do by itself.

    AcceleratorState switches to FSDP only from an accelerator-device type (MULTI_GPU, MULTI_XPU, ...);
    a CPU-only host is MULTI_CPU, which accelerate 1.15 leaves as plain DDP with the FSDP plugin unused.
    The full state dict is gathered without offload_to_cpu: with the parameters already on the CPU,
    torch's offload path returns the root unit's parameters (embeddings, final norm) as local flat
    shards, and the saved checkpoint would not load. On GPUs the offload is a real copy and is kept.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            self.device = torch.device("cpu")  # FSDP compares it with the parameters' device: not "cpu:0"

    AcceleratorState.__init__ = patched
    get_state_dict = Accelerator.get_state_dict

    def gathered(self, model, unwrap=True):  # Trainer.save_model gathers through this too
        if not isinstance(model, FSDP):
            return get_state_dict(self, model, unwrap)
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
            return model.state_dict()

    Accelerator.get_state_dict = gathered


def main() -> None:
    folder, recipe, *overrides = sys.argv[1:]
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":  # set by accelerate launch
        fsdp_on_cpu()
    count_fusable()
    init = trainer_module.NexusSFTTrainer.__init__

    def probed_init(self, *args, **kwargs):  # test-only: the production trainer takes no probe
        init(self, *args, **kwargs)
        self.add_callback(Probe(self, Path(folder)))

    trainer_module.NexusSFTTrainer.__init__ = probed_init
    run_training(recipe, overrides)


if __name__ == "__main__":
    main()
