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
AutoParallel (a digest of its installed source, autoparallel_version) and this package's
source. So a changed model, mesh, batch, constraint or engine misses and the start is cold
again; tests/test_graph_cache.py checks each.

An entry is a pickle, and unpickling runs whatever code the file names, so nothing is
unpickled before it is trusted: the file starts with a header (a magic line, then the
length of a JSON object and the object: the key, the payload's size and SHA-256), and the
pickle is read only when the header's key is this start's, the payload is whole, and the
cache folder, the entry's folder and the file are this user's and not writable by group or
others (folders are created 0700, entries 0600, written to a temporary file and renamed).
Any other entry is a warning naming why, and the start plans as usual.

Plans without expert parallelism: their graphs have routing-dependent (unbacked) sizes that
AOTAutograd's serializer does not take. Eager entries hold our eager runner's graphs;
compiled entries (--compile.enable) hold Inductor's output code, whose C++ kernels load from
Inductor's cache folder (the component's compile_cache_dir), built again if it was emptied.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pickle
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torchtitan.tools.logging import logger

from torchtitan_ext.dump_folder import written_whole

# Bump when the entry's layout changes.
_FORMAT = 2

# An entry file: _MAGIC, the header's length (8 bytes, big-endian), the header (JSON: key,
# payload_bytes, payload_sha256), then the payload (the pickled CacheEntry).
_MAGIC = b"torchtitan_ext graph cache entry\n"
_MAX_HEADER_BYTES = 1 << 20


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


def _source_digest(root: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        data = path.read_bytes()
        digest.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def _package_source_digest() -> str:
    # The component's own graph passes (eager runner, constraints, MoE region) shape the
    # cached graphs: a changed package source is a miss.
    root = Path(__file__).parent
    return _source_digest(root, list(root.glob("*.py")))


@functools.cache
def autoparallel_version() -> str:
    """The installed AutoParallel: a digest of its package's Python source (every *.py
    under the package folder). It is installed from git or a tarball without a version
    that names its code, so graph cache entries and placement files (plan_key) hold this."""
    spec = importlib.util.find_spec("autoparallel")
    if spec is None or spec.origin is None:
        raise ImportError("Meta's AutoParallel is not installed (no 'autoparallel' package)")
    root = Path(spec.origin).parent
    return _source_digest(root, list(root.rglob("*.py")))


def cache_key(*, plan_key: dict, mesh, options: dict, placement_file: str) -> dict:
    """Everything an entry's graphs depend on (see the module docstring); ``plan_key``
    holds the torch and AutoParallel versions."""
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
    digest = hashlib.sha256(_canonical(key).encode()).hexdigest()
    return os.path.join(cache_dir, digest[:20], f"rank{key['rank']}.pkl")


def _canonical(key: dict) -> str:
    # As the header holds the key: a header's key is this start's iff their texts are equal.
    return json.dumps(key, sort_keys=True, default=str)


def _unsafe(st: os.stat_result, what: str) -> str:
    """Why a folder or entry file with this stat is not trusted; "" if it is."""
    if st.st_uid != os.getuid():
        return f"{what} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


class _UnusableEntry(Exception):
    """An entry file that is there but must not be unpickled; the message says why."""


def load(cache_dir: str, key: dict) -> tuple[CacheEntry | None, str]:
    """The entry for ``key``, or None and why not. An entry that is there but unusable
    (another key, a bad header, truncated, unsafe owner or permissions) is never unpickled
    and is logged as a warning."""
    path = entry_path(cache_dir, key)
    if not os.path.exists(path):
        return None, f"no entry at {path}"
    try:
        payload = _trusted_payload(cache_dir, path, key)
        # Unpickled only now: a file this user wrote, for this very key, whole.
        entry = pickle.loads(payload)
        if not isinstance(entry, CacheEntry) or entry.key != key:
            raise _UnusableEntry("its payload is not the entry its header names")
    except (OSError, _UnusableEntry) as e:
        why = f"{path} not used: {e}"
    except Exception as e:  # a payload this package cannot unpickle (changed classes)
        why = f"{path} not used: not readable ({type(e).__name__}: {e})"
    else:
        return entry, path
    logger.warning(f"AutoParallel: graph cache entry {why}")
    return None, why


def _trusted_payload(cache_dir: str, path: str, key: dict) -> bytes:
    """The pickled entry in the file at ``path``, once the cache folder, the entry's folder
    and the file are this user's and not writable by others, and its header holds ``key``
    and the payload's size and digest; else _UnusableEntry. Each is opened relative to the
    folder checked before it, without following links, so what was checked is what is read."""
    nofollow = os.O_RDONLY | os.O_NOFOLLOW
    folder = os.path.dirname(path)
    with contextlib.ExitStack() as stack:

        def checked(fd: int, what: str) -> int:
            stack.callback(os.close, fd)
            problem = _unsafe(os.fstat(fd), what)
            if problem:
                raise _UnusableEntry(problem)
            return fd

        root_fd = checked(
            os.open(cache_dir, os.O_RDONLY | os.O_DIRECTORY), f"cache folder {cache_dir}"
        )
        folder_fd = checked(
            os.open(os.path.basename(folder), nofollow | os.O_DIRECTORY, dir_fd=root_fd),
            f"folder {folder}",
        )
        # O_NONBLOCK: a FIFO here fails the regular-file check instead of blocking the open.
        fd = checked(
            os.open(os.path.basename(path), nofollow | os.O_NONBLOCK, dir_fd=folder_fd),
            "the entry file",
        )
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _UnusableEntry("not a regular file")
        f = stack.enter_context(os.fdopen(os.dup(fd), "rb"))
        if f.read(len(_MAGIC)) != _MAGIC:
            raise _UnusableEntry("no graph cache header (not an entry, or an older format)")
        size = int.from_bytes(f.read(8), "big")
        if size > _MAX_HEADER_BYTES:
            raise _UnusableEntry(f"malformed header (claims {size} bytes)")
        text = f.read(size)
        try:
            header = json.loads(text)
        except ValueError as e:
            what = "truncated header" if len(text) < size else "malformed header"
            raise _UnusableEntry(f"{what} ({e})") from None
        if not (
            isinstance(header, dict)
            and isinstance(header.get("key"), dict)
            and isinstance(header.get("payload_bytes"), int)
            and isinstance(header.get("payload_sha256"), str)
        ):
            raise _UnusableEntry("malformed header (not key, payload_bytes and payload_sha256)")
        saved = header["key"]
        if _canonical(saved) != _canonical(key):
            expected = json.loads(_canonical(key))
            differ = sorted(n for n in {*expected, *saved} if saved.get(n) != expected.get(n))
            raise _UnusableEntry(f"saved for another key (differs in {', '.join(differ)})")
        payload = f.read()
    size = header["payload_bytes"]
    if len(payload) != size:
        raise _UnusableEntry(f"truncated ({len(payload)} of {size} payload bytes)")
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise _UnusableEntry("the payload does not match its header's SHA-256")
    return payload


def save(cache_dir: str, entry: CacheEntry) -> str:
    """Write ``entry`` whole or not at all (a temporary file in the entry's folder, synced,
    then renamed over the entry). PermissionError if a folder is not safe to load from."""
    path = entry_path(cache_dir, entry.key)
    folder = os.path.dirname(path)
    # makedirs gives its mode to the last folder only: cache_dir first.
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    for where, what in ((cache_dir, f"cache folder {cache_dir}"), (folder, f"folder {folder}")):
        problem = _unsafe(os.stat(where), what)
        if problem:
            raise PermissionError(f"{problem}: entries there would not be loaded")
    payload = pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)
    header = json.dumps(
        {
            "key": json.loads(_canonical(entry.key)),
            "payload_bytes": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
        },
        sort_keys=True,
    ).encode()
    with written_whole(path) as tmp:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(_MAGIC + len(header).to_bytes(8, "big") + header)
            f.write(payload)
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
