"""The fused level-1 projection reads a weight only when the whole weight is in hand.

DeepSpeed ZeRO-3 partitions parameters (an empty `ds_id`-tagged placeholder outside the module's own
forward, gathered by hooks) and FSDP flattens them: a matmul over concatenated weights would read the
placeholders. Such projections take the per-module path, where the engine's own hooks run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nexus_retrofit import NexusConfig, convert
from nexus_retrofit.modeling.modeling_nexus import _fusable
from tests.conftest import perturb_nexus, tiny_base_model


def _plain() -> nn.Linear:
    return nn.Linear(8, 4)


def _hooked() -> nn.Linear:
    linear = _plain()
    linear.register_forward_pre_hook(lambda module, args: None)
    return linear


def _zero3_partitioned() -> nn.Linear:
    linear = _plain()
    linear.weight.ds_id = 7  # what deepspeed.zero.Init tags every parameter with
    return linear


def _flattened() -> nn.Linear:
    linear = _plain()
    linear.weight = nn.Parameter(torch.empty(0))  # a shard of a flat parameter lives elsewhere
    return linear


class _Wrapped(nn.Linear):  # e.g. a LoRA or quantised Linear: its forward is not linear(x, W, b)
    pass


@pytest.mark.parametrize(
    "make,fusable",
    [
        pytest.param(_plain, True, id="plain"),
        pytest.param(_hooked, False, id="hooked"),
        pytest.param(_zero3_partitioned, False, id="zero3-partitioned"),
        pytest.param(_flattened, False, id="flattened"),
        pytest.param(lambda: _Wrapped(8, 4), False, id="subclass"),
    ],
)
def test_only_whole_plain_linears_are_fused(make, fusable):
    assert _fusable(make()) is fusable


def test_a_partitioned_projection_is_gathered_by_its_own_hook_not_read_by_the_fused_matmul(ids):
    """A simulated ZeRO-3 Linear: the weight is an empty placeholder until a pre-forward hook puts the
    real one in place. The layer must call the module, so logits equal the unpartitioned model's."""
    model = convert(tiny_base_model("qwen2"), NexusConfig(order=2, inner="separate"))
    perturb_nexus(model)
    with torch.no_grad():
        want = model(ids).logits
    linear = model.model.layers[0].self_attn.inner.q.k_proj
    full = linear.weight.detach().clone()
    placeholder = nn.Parameter(torch.empty(0))
    placeholder.ds_id = 3
    linear.weight = placeholder

    def gather(module, args):
        module.weight = nn.Parameter(full)

    def release(module, args, output):
        module.weight = placeholder

    linear.register_forward_pre_hook(gather)
    linear.register_forward_hook(release)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # fused vs per-module matmuls may round apart


def test_a_tensor_parallel_weight_is_never_fused(tmp_path):
    """transformers' tp_plan="auto" shards weights as DTensors; concatenating them into one matmul
    failed ("aten.addmm got mixed torch.Tensor and DTensor") for inner=shared and self. A one-rank
    gloo group is enough to make a real DTensor on CPU."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        linear = nn.Linear(8, 8)
        assert _fusable(linear)
        linear.weight = nn.Parameter(distribute_tensor(linear.weight.detach(), mesh, [Replicate()]))
        assert not _fusable(linear)
    finally:
        dist.destroy_process_group()
