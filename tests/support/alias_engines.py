"""Transforms that break aliasing, and the checks tests/test_aliases.py runs after them.

Each ``run_*`` function takes a model class from ``alias_models``, builds the model, runs
one real transform (meta round trip, ``distribute_module``, FSDP2, AutoParallel) followed
by ``restore`` + ``keep_tied`` + init + ``verify``, and compares the result with the plain
model (``check_against_reference``). They run in the pytest process (one rank) or in each
spawned rank of the multi-process test.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module

from tests.support.alias_models import MODELS, TiedLM
from torchtitan_ext.aliases import AliasMap, unique_storage_bytes


@contextlib.contextmanager
def process_group(
    backend: str, *, world_size: int = 1, rank: int = 0, init_file: str | None = None
) -> Iterator[None]:
    """A default process group for the duration of the block (gloo, or fake for tracing)."""
    if dist.is_initialized():
        raise RuntimeError("a default process group is already initialized in this process")
    if backend == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore

        store: dist.Store = FakeStore()
    else:
        store = dist.FileStore(init_file, world_size)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- reference


@dataclass
class Reference:
    """The plain model after init, one forward/backward on the full batch."""

    model: nn.Module
    fqns: dict[str, list[str]]
    state_dict_keys: list[str]
    storage_bytes: int
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]


def fqn_lists(model: nn.Module) -> dict[str, list[str]]:
    return {
        "parameters": sorted(n for n, _ in model.named_parameters(remove_duplicate=False)),
        "buffers": sorted(n for n, _ in model.named_buffers(remove_duplicate=False)),
        "modules": sorted(n for n, _ in model.named_modules(remove_duplicate=False)),
    }


def loss_of(output: torch.Tensor) -> torch.Tensor:
    return output.float().square().mean()


def reference(model_cls: type[nn.Module], full_batch: torch.Tensor) -> Reference:
    model = model_cls()
    # The plain model needs the same help: its init reassigns one alias too.
    AliasMap.capture(model).keep_tied(model)
    model.init_weights()
    for fqn, expected in model_cls.expected_init().items():
        torch.testing.assert_close(_get(model, fqn), expected, msg=f"reference {fqn}")
    loss = loss_of(model(full_batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return Reference(
        model=model,
        fqns=fqn_lists(model),
        state_dict_keys=sorted(model.state_dict()),
        storage_bytes=unique_storage_bytes(model),
        loss=loss.detach(),
        grads=grads,
    )


def check_tied_gradient_accumulates(full_batch: torch.Tensor) -> None:
    """The tied weight's gradient is the sum of both uses' gradients (checked untied)."""
    ref = reference(TiedLM, full_batch)
    untied = TiedLM()
    untied.load_state_dict(ref.model.state_dict())
    untied.tok_embeddings.weight = nn.Parameter(ref.model.lm_head.weight.detach().clone())
    loss_of(untied(full_batch)).backward()
    from_embedding = untied.tok_embeddings.weight.grad
    from_output = untied.lm_head.weight.grad
    assert from_embedding.abs().sum() > 0 and from_output.abs().sum() > 0
    torch.testing.assert_close(ref.grads["tok_embeddings.weight"], from_embedding + from_output)


def _get(model: nn.Module, fqn: str) -> torch.Tensor:
    buffers = dict(model.named_buffers(remove_duplicate=False))
    return buffers[fqn] if fqn in buffers else model.get_parameter(fqn)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def check_against_reference(
    parallel: nn.Module,
    alias_map: AliasMap,
    ref: Reference,
    model_cls: type[nn.Module],
    *,
    loss: torch.Tensor,
    sharded: bool = False,
) -> None:
    """After restore + init + verify: same names, one storage per group, same numerics.

    ``loss`` is the parallel model's loss for the full batch (already reduced over ranks);
    its backward must have run. ``sharded``: parameters are sharded, so the storage total
    cannot match the plain model's.
    """
    alias_map.verify(parallel)
    assert fqn_lists(parallel) == ref.fqns
    assert sorted(parallel.state_dict()) == ref.state_dict_keys
    for group in alias_map.groups:
        objs = [parallel.get_submodule(f) for f in group.fqns] if group.kind == "module" else []
        objs = objs or [_get(parallel, f) for f in group.fqns]
        assert all(o is objs[0] for o in objs), f"{group} is not one object"
    if not sharded:
        assert unique_storage_bytes(parallel) == ref.storage_bytes
    for fqn, expected in model_cls.expected_init().items():
        torch.testing.assert_close(_full(_get(parallel, fqn)), expected, msg=f"init {fqn}")
    torch.testing.assert_close(loss.detach(), ref.loss)
    for fqn, grad in ref.grads.items():
        param = parallel.get_parameter(fqn)
        assert param.grad is not None, f"no gradient for {fqn}"
        torch.testing.assert_close(_full(param.grad), grad, msg=f"grad {fqn}")


# ---------------------------------------------------------------------- transforms


def run_meta_roundtrip(model_cls: type[nn.Module]) -> None:
    """deepcopy, move to meta (splits every alias), to_empty + init_weights."""
    batch = model_cls.sample()
    ref = reference(model_cls, batch)
    model = model_cls()
    alias_map = AliasMap.capture(model)
    parallel = copy.deepcopy(model).to("meta")
    alias_map.restore(parallel)
    alias_map.keep_tied(parallel)
    parallel.to_empty(device="cpu")
    parallel.init_weights()
    loss = loss_of(parallel(batch))
    loss.backward()
    check_against_reference(parallel, alias_map, ref, model_cls, loss=loss)


def run_distribute_module(model_cls: type[nn.Module], mesh: DeviceMesh) -> None:
    """distribute_module replicates each module's tensors separately: aliases split."""
    batch = model_cls.sample()
    ref = reference(model_cls, batch)
    model = model_cls()
    alias_map = AliasMap.capture(model)

    def to_dtensors(module: nn.Module, inputs: tuple, device_mesh: DeviceMesh) -> tuple:
        return tuple(DTensor.from_local(x, device_mesh, [Replicate()]) for x in inputs)

    parallel = distribute_module(model, mesh, input_fn=to_dtensors)
    alias_map.restore(parallel)
    alias_map.keep_tied(parallel)
    parallel.init_weights()
    loss = loss_of(parallel(batch))
    loss.backward()
    check_against_reference(parallel, alias_map, ref, model_cls, loss=loss.full_tensor())


def run_fsdp2(model_cls: type[nn.Module], mesh: DeviceMesh) -> None:
    """FSDP2 on a meta model: to_empty splits aliased buffers; init reassigns one name.

    Tied parameters must sit in one FSDP group (here the root's), as FSDP2 requires.
    """
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    batch = model_cls.sample(batch=2 * world)
    ref = reference(model_cls, batch)
    with torch.device("meta"):
        model = model_cls()
    alias_map = AliasMap.capture(model)
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            for layer in child:
                fully_shard(layer, mesh=mesh)
    parallel = fully_shard(model, mesh=mesh)
    for module in parallel.modules():
        if hasattr(module, "set_force_sum_reduction_for_comms"):
            module.set_force_sum_reduction_for_comms(True)  # gloo has no AVG/PREMUL_SUM
    alias_map.restore(parallel)
    alias_map.keep_tied(parallel)
    parallel.to_empty(device="cpu")
    parallel.init_weights()
    loss = loss_of(parallel(batch.chunk(world)[rank]))
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    check_against_reference(
        parallel, alias_map, ref, model_cls, loss=mean_loss / world, sharded=world > 1
    )


def autoparallel(
    model: nn.Module,
    mesh: DeviceMesh,
    sample: torch.Tensor,
    *,
    pair_aliases: bool = True,
    param_memory_high: float | None = None,
) -> tuple[nn.Module, AliasMap]:
    """Trace and solve ``model`` (on meta) with AutoParallel; batch sharded on mesh dim 0.
    ``param_memory_high``: at most this fraction of the parameters per rank (FSDP-like)."""
    from autoparallel.api import AutoParallel
    from autoparallel.input_validation import _build_input_fn_from_sample

    from torchtitan_ext import cpu
    from torchtitan_ext.parallelize.constraints import constrain_alias_placements
    from torchtitan_ext.patches import reset_autoparallel_caches

    cpu.install_runtime()
    reset_autoparallel_caches()
    alias_map = AliasMap.capture(model)  # before tracing: refuses what tracing would crash on
    batch_sharded = (Shard(0),) + (Replicate(),) * (mesh.ndim - 1)
    input_fn, _ = _build_input_fn_from_sample(
        (DTensor.from_local(sample, mesh, batch_sharded),), mesh
    )

    with AutoParallel(model, input_fn, mesh) as autop:
        autop.add_input_constraints([batch_sharded])
        autop.add_output_constraints([batch_sharded])
        if pair_aliases:
            constrain_alias_placements(autop, alias_map)
        if param_memory_high is not None:
            autop.add_parameter_memory_constraint(low=0.0, high=param_memory_high)
        parallel = autop.apply_placement(autop.optimize_placement())
    return parallel, alias_map


def run_autoparallel(model_cls: type[nn.Module], mesh: DeviceMesh, *, sharded: bool = False):
    """AutoParallel's plan (replicated parameters, for these toys) or, ``sharded``, an
    FSDP-like one (at most 1/world of the parameters per rank); either way every name,
    value and gradient is compared with the plain model's, gathered where sharded."""
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = model_cls.sample(batch=2 * world)
    ref = reference(model_cls, batch)
    local_batch = batch.chunk(world)[rank]
    with torch.device("meta"):
        model = model_cls()
    parallel, alias_map = autoparallel(
        model, mesh, local_batch, param_memory_high=1.0 / world if sharded else None
    )
    if sharded:
        sharded_names = [
            name
            for name, param in parallel.named_parameters(remove_duplicate=False)
            if any(p.is_shard() for p in param.placements)
        ]
        tied = {f for group in alias_map.groups if group.kind == "parameter" for f in group.fqns}
        assert sharded_names and tied <= set(sharded_names), (sharded_names, tied)
    alias_map.restore(parallel)
    alias_map.keep_tied(parallel)
    parallel.to_empty(device="cpu")
    parallel.init_weights()
    # The graph differentiates the sum of the ranks' losses (the batch is one global
    # tensor), so each rank contributes its mean / world to get the global mean.
    loss = loss_of(parallel(local_batch)) / world
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    check_against_reference(parallel, alias_map, ref, model_cls, loss=mean_loss, sharded=sharded)


# ---------------------------------------------------------------------- two ranks


# The toys whose aliased tensor is a parameter (tied) or sits beside sharded parameters
# (shared buffers), run again under an FSDP-like plan.
SHARDED_TOYS = ("tied", "shared_buffers")


def two_rank_worker(rank: int, world_size: int, init_file: str, transforms: list[str]) -> None:
    """``transforms`` (names of ``run_*``) for every model, on ``world_size`` gloo ranks."""
    os.environ.setdefault("TORCHTITAN_EXT_DEVICE", "cpu")
    torch.set_num_threads(1)
    runs = {"fsdp2": run_fsdp2, "distribute_module": run_distribute_module}
    runs["autoparallel"] = run_autoparallel
    runs["autoparallel_sharded"] = functools.partial(run_autoparallel, sharded=True)
    with process_group("gloo", world_size=world_size, rank=rank, init_file=init_file):
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
        for name, model_cls in MODELS.items():
            for transform in transforms:
                if transform == "autoparallel_sharded" and name not in SHARDED_TOYS:
                    continue
                runs[transform](model_cls, mesh)
    # A rank that finished can still abort in the interpreter's teardown under gloo
    # (pytorch/pytorch#179291): end it first, as torchtitan_ext.cpu does for training.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
