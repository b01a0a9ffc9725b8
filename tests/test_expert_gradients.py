"""The expert-gradient check and report of torchtitan_ext.parallelize.expert_parallel on
given placements (no engine): which data axes an expert gradient must be summed over, and
how the plan sums it. The engine runs that plan them are in tests/test_moe.py."""

from __future__ import annotations

import pytest
from torch.distributed.tensor import Partial, Replicate, Shard

from torchtitan_ext.parallelize.expert_parallel import (
    check_expert_gradients,
    expert_gradient_reductions,
)

W1 = "layers.1.moe.routed_experts.inner_experts.w1_EFD"
W2 = "layers.1.moe.routed_experts.inner_experts.w2_EDF"


def test_partial_on_every_data_axis_but_ep_passes():
    axes = ["dp_replicate", "efsdp", "ep"]
    declared = {fqn: (Partial(), Partial(), Shard(0)) for fqn in (W1, W2)}
    check_expert_gradients(declared, axes=axes, experts=2)


@pytest.mark.parametrize(
    "axes, w2",
    [
        (["efsdp", "ep"], (Replicate(), Shard(0))),  # local_map's default: the fault
        (["dp_replicate", "efsdp", "ep"], (Partial(), Replicate(), Shard(0))),
        (["dp_replicate", "ep"], (Replicate(), Shard(0))),
    ],
)
def test_a_gradient_complete_on_a_data_axis_is_refused(axes, w2):
    declared = {W1: tuple(Shard(0) if a == "ep" else Partial() for a in axes), W2: w2}
    with pytest.raises(RuntimeError, match="refusing a plan that drops expert gradient") as e:
        check_expert_gradients(declared, axes=axes, experts=2)
    assert W2 in str(e.value) and W1 not in str(e.value)


def test_an_expert_parameter_not_found_is_refused():
    with pytest.raises(RuntimeError, match="1 expert parameter"):
        check_expert_gradients({W1: (Partial(), Shard(0))}, axes=["efsdp", "ep"], experts=2)


def test_ep_alone_needs_no_reduction():
    check_expert_gradients({W1: (Shard(0),)}, axes=["ep"], experts=1)
    assert expert_gradient_reductions({W1: (Shard(0),)}, {W1: (Shard(0),)}, axes=["ep"]) == {
        W1: "none"
    }


def test_reductions_follow_the_parameter_placement():
    axes = ["dp_replicate", "efsdp", "ep"]
    declared = {W1: (Partial(), Partial(), Shard(0))}
    parameters = {W1: (Replicate(), Shard(0), Shard(0))}
    assert expert_gradient_reductions(declared, parameters, axes=axes) == {
        W1: "all_reduce over dp_replicate, reduce_scatter over efsdp"
    }
