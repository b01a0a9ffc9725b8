"""Warm starts without tracing: a cache of the parallel model AutoParallel built.

A cold start traces the joint graph, solves (or loads the placement file) and applies the
placements (apply_sharding, AOTAutograd's partition, our eager runner's bucketing and overlap
scheduling): 9-11 s of a 24 s start for the debug model on 2 CPU ranks, every start. The
cache stores what those phases produce, per rank: AOTAutograd's compiled forward and
backward with their runtime metadata (its bundled, serializable form), the placement of
every parameter and buffer, the input and output specs, and the plan report. A warm start
rebuilds the parallel module from them on the meta device, as AutoParallel's
make_parallel_module does, and skips AutoParallel altogether.

An entry is found by a digest of its key and used only when the whole key is equal: the
model (its config after update_from_config), the mesh and its process-group names, the
global input shapes, dtypes and constraints (plan_key), the placement file's contents, this
rank and world size, the component's graph options, and the versions of torch, torchtitan,
AutoParallel and this package's source. So a changed model, mesh, batch, constraint or
engine misses and the start is cold again; tests/test_graph_cache.py checks each.

Plans without expert parallelism: their graphs have routing-dependent (unbacked) sizes that
AOTAutograd's serializer does not take. Eager entries hold our eager runner's graphs;
compiled entries (--compile.enable) hold Inductor's output code, whose C++ kernels load from
Inductor's cache folder (the component's compile_cache_dir), built again if it was emptied.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

# Bump when the entry's layout changes.
_FORMAT = 1


@dataclass
class TensorSpec:
    """A parameter or buffer of the parallel module: global shape, dtype, placements."""

    fqn: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    placements: tuple
    requires_grad: bool


@dataclass
class CacheEntry:
    """What a warm start needs instead of trace, solve and apply (one rank's)."""

    key: dict
    compiled: bytes
    """AOTAutograd's bundled forward + backward (BundledAOTAutogradSerializableCallable):
    our eager runner's graphs, or Inductor's compiled code."""
    parameters: list[TensorSpec]
    """In the order the compiled graphs take them (AutoParallel's params_spec)."""
    buffers: list[TensorSpec]
    in_spec: object
    """pytree spec of the traced (args, kwargs), to order a call's keyword arguments."""
    out_spec: object
    input_shapes: list[tuple[int, ...]]
    """Local shapes of the flat model inputs on this rank."""
    report: object
    """The PlanReport of the cold start."""


def _package_source_digest() -> str:
    # The component's own graph passes (eager runner, constraints, MoE region) shape the
    # cached graphs: a changed package source is a miss.
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(*, plan_key: dict, mesh, options: dict, placement_file: str) -> dict:
    """Everything an entry's graphs depend on (see the module docstring)."""
    placements = "solved"
    if placement_file and os.path.exists(placement_file):
        placements = hashlib.sha256(Path(placement_file).read_bytes()).hexdigest()[:16]
    return {
        "format": _FORMAT,
        **plan_key,
        "process_groups": [mesh.get_group(i).group_name for i in range(mesh.ndim)],
        "rank": torch.distributed.get_rank() if torch.distributed.is_initialized() else 0,
        "world_size": (
            torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        ),
        "placements": placements,
        "options": options,
        "torchtitan": importlib.metadata.version("torchtitan"),
        "torchtitan_ext": _package_source_digest(),
    }


def entry_path(cache_dir: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return os.path.join(cache_dir, digest[:20], f"rank{key['rank']}.pkl")


def load(cache_dir: str, key: dict) -> tuple[CacheEntry | None, str]:
    """The entry for ``key``, or None and why not (no entry, unreadable, another key)."""
    path = entry_path(cache_dir, key)
    if not os.path.exists(path):
        return None, f"no entry at {path}"
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f)
    except Exception as e:  # a truncated or foreign file is a miss, not a failed start
        return None, f"{path} is not readable ({type(e).__name__}: {e})"
    if not isinstance(entry, CacheEntry) or entry.key != key:
        return None, f"{path} was saved for another key"
    return entry, path


def save(cache_dir: str, entry: CacheEntry) -> str:
    path = entry_path(cache_dir, entry.key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        pickle.dump(entry, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)  # a reader never sees half a file
    return path


class NotSerializable(RuntimeError):
    """AOTAutograd refused to compile the graphs in its serializable form."""


@contextlib.contextmanager
def serializable_compile(captured: dict):
    """Make AutoParallel's apply_placement compile its graphs in AOTAutograd's serializable
    form and put the serializable callable in ``captured["compiled"]``.

    AutoParallel a54c252 calls aot_compile_joint_with_descriptors without serializable=True
    and keeps only a closure around the result; we wrap the function it imported. With
    serializable=True AOTAutograd compiles the backward at once (not at the first backward)
    and bundles both graphs with its runtime metadata; the graphs and how they run are
    unchanged. The fw/bw compilers must return an OutputCode: Inductor's compiled graph,
    or our eager runner wrapped by eager_output_code."""
    import autoparallel.api as ap_api

    compile_joint = ap_api.aot_compile_joint_with_descriptors

    def compile_serializable(jd, **kwargs):
        try:
            fn = compile_joint(jd, serializable=True, **kwargs)
        except Exception as e:
            raise NotSerializable(
                f"AOTAutograd could not serialize the graphs ({type(e).__name__}: {e})"
            ) from e
        compiled = fn
        # simple_wraps: the returned function's __wrapped__ is the serializable callable.
        while not hasattr(compiled, "serialize_compile_artifacts"):
            compiled = compiled.__wrapped__
        captured["compiled"] = compiled
        return fn

    ap_api.aot_compile_joint_with_descriptors = compile_serializable
    try:
        yield
    finally:
        ap_api.aot_compile_joint_with_descriptors = compile_joint


def eager_output_code(runner: torch.fx.GraphModule):
    """Our eager runner as the OutputCode AOTAutograd's serializer takes: Inductor's
    RegionalOutputCode, which pickles a GraphModule (with GraphPickler). Its default op
    filter refuses the _c10d_functional collectives, which our graphs are made of; and
    no node metadata is kept: the runner's generated code needs none, and some of it
    (Inductor's bucketing passes leave fake-tensor state there) does not pickle."""
    from torch._inductor.output_code import RegionalOutputCode

    return RegionalOutputCode(runner, ops_filter=None, node_metadata_key_filter=_no_metadata)


# Module level, not a lambda: RegionalOutputCode pickles its filters with the graph.
def _no_metadata(key: str) -> bool:
    return False


def make_entry(
    *, key: dict, captured: dict, autop, parallel_model: nn.Module, input_placement, report
) -> CacheEntry:
    """The entry of a cold start, from AutoParallel's state after apply_placement;
    ``input_placement``: the placements (one per mesh axis) the inputs were planned with."""
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable

    jd = autop.joint_with_descriptors

    def spec(fqn: str, tensor: DTensor) -> TensorSpec:
        return TensorSpec(fqn, tuple(tensor.shape), tensor.dtype, tuple(tensor.placements),
                          tensor.requires_grad)  # fmt: skip

    traced = autop._traced_inputs
    flat_inputs, in_spec = torch.utils._pytree.tree_flatten((tuple(traced.args), traced.kwargs))
    input_shapes = []
    for value in flat_inputs:
        shape = list(value.shape)
        for axis, placement in enumerate(input_placement):
            if placement.is_shard():
                shape[placement.dim] //= autop.mesh.size(axis)
        input_shapes.append(tuple(shape))
    return CacheEntry(
        key=key,
        compiled=BundledAOTAutogradSerializableCallable.serialize_compile_artifacts(
            captured["compiled"]
        ),
        parameters=[spec(f, parallel_model.get_parameter(f)) for f in jd.params_spec],
        buffers=[spec(f, parallel_model.get_buffer(f)) for f in jd.buffers_spec],
        in_spec=in_spec,
        out_spec=jd.out_spec,
        input_shapes=input_shapes,
        report=report,
    )


def build_parallel_module(model: nn.Module, entry: CacheEntry, mesh) -> nn.Module:
    """The parallel module of a cold start, rebuilt from ``entry``: the same class, FQNs,
    meta DTensor parameters and buffers with the same placements, and a forward that runs
    the cached graphs as AutoParallel's forward runs its own. Issues no collective (the
    caller creates the flattened mesh's group once every rank has a module)."""
    from autoparallel.module_construction import make_parallel_module
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable
    from torch.export._tree_utils import reorder_kwargs

    compiled = BundledAOTAutogradSerializableCallable.deserialize_compile_artifacts(entry.compiled)

    def sharded(spec: TensorSpec) -> DTensor:
        # As AutoParallel shards a parameter: replicated meta tensor, redistributed.
        empty = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
        replicated = DTensor.from_local(empty, mesh, (Replicate(),) * mesh.ndim)
        return replicated.redistribute(mesh, spec.placements)

    parameters = {s.fqn: nn.Parameter(sharded(s), requires_grad=s.requires_grad)
                  for s in entry.parameters}  # fmt: skip
    buffers = {s.fqn: sharded(s) for s in entry.buffers}
    param_fqns = [s.fqn for s in entry.parameters]
    buffer_fqns = [s.fqn for s in entry.buffers]
    in_spec, out_spec, input_shapes = entry.in_spec, entry.out_spec, entry.input_shapes

    def forward(self, *args, **kwargs):
        if kwargs:
            kwargs = reorder_kwargs(kwargs, in_spec)
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        shapes = [tuple(x.shape) for x in inputs]
        if shapes != input_shapes:
            raise ValueError(
                f"the parallel model (from the graph cache) takes inputs of local shapes "
                f"{input_shapes}, got {shapes}"
            )
        # Looked up at each call, as AutoParallel's forward does: the Trainer's to_empty()
        # and checkpoint loads replace the tensors.
        flat = [self.get_parameter(f).to_local() for f in param_fqns]
        flat += [self.get_buffer(f).to_local() for f in buffer_fqns]
        outputs = compiled(*flat, *inputs)  # the deserialized callable boxes them itself
        return torch.utils._pytree.tree_unflatten(outputs, out_spec)

    # A copy keeps the original meta model untouched: make_parallel_module copies each
    # submodule's __dict__ shallowly, so registering names would write into the original.
    return make_parallel_module(copy.deepcopy(model), parameters, buffers, forward_fn=forward)
