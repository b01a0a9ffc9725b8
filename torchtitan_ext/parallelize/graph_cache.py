"""Warm starts without tracing: a cache of the parallel model AutoParallel built.

A cold start traces the joint graph, solves (or loads the placement file) and applies the
placements (apply_sharding, AOTAutograd's partition, our eager runner's bucketing and overlap
scheduling), the larger part of every start (benchmarks/README.md, warm starts). The
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

Plans with expert parallelism are cached too: their graphs size the tokens each rank's experts
receive from the routing (unbacked sizes), which the bundled form keeps and the rebuilt module
computes at each step as the traced one does. Eager entries hold our eager runner's graphs;
compiled entries (--compile.enable) hold Inductor's output code, whose C++ kernels load from
Inductor's cache folder (the component's compile_cache_dir), built again if it was emptied.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pickle
import stat
import time
from pathlib import Path

import torch
from torch import nn
from torchtitan.tools.logging import logger

from torchtitan_ext.dump_folder import written_whole
from torchtitan_ext.parallelize.graph_cache_entry import (
    CacheEntry,
    build_parallel_module,
    make_entry,
)
from torchtitan_ext.parallelize.report import PhaseTimes, PlanReport
from torchtitan_ext.parallelize.spec import PlanSpec, source_digest
from torchtitan_ext.ranks import agree_across_ranks

# Bump when the entry's layout changes.
_FORMAT = 2

# An entry file: _MAGIC, the header's length (8 bytes, big-endian), the header (JSON: key,
# payload_bytes, payload_sha256), then the payload (the pickled CacheEntry).
_MAGIC = b"torchtitan_ext graph cache entry\n"
_MAX_HEADER_BYTES = 1 << 20


def _package_source_digest() -> str:
    # The component's own graph passes (eager runner, constraints, MoE region) shape the
    # cached graphs: a changed package source is a miss.
    root = Path(__file__).parent.parent
    return source_digest(root, list(root.rglob("*.py")))


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


class GraphCache:
    """One start's use of the graph cache: its folder and the options its key holds."""

    def __init__(self, *, folder: str, spec: PlanSpec, options: dict):
        self.folder = folder
        self.spec = spec
        self.options = options
        """The component's graph options (eager_overlap, all-reduce buckets, compile, AC)."""

    @classmethod
    def for_start(cls, *, config, spec: PlanSpec, dump_folder: str) -> GraphCache | None:
        """The cache of this start (``config``: the component's), or None: no folder
        configured."""
        folder = config.graph_cache_dir
        if not folder:
            return None
        if not os.path.isabs(folder):
            folder = os.path.join(dump_folder, folder)
        options = {
            "eager_overlap": config.eager_overlap,
            "all_reduce_bucket_mb": config.all_reduce_bucket_mb,
            "compile": spec.compile,
            "activation_checkpoint": spec.ac,
        }
        return cls(folder=folder, spec=spec, options=options)

    def key(self) -> dict:
        """This start's key. Computed at each use: a solve may have just written the
        placement file, whose contents the next start's key holds."""
        return cache_key(
            plan_key=self.spec.key,
            mesh=self.spec.mesh,
            options=self.options,
            placement_file=self.spec.placement_path,
        )

    def load(self, model: nn.Module, times: PhaseTimes) -> tuple[nn.Module, PlanReport] | None:
        """The parallel model rebuilt from the cache and its plan report, or None (a cold
        start follows)."""
        spec = self.spec
        t0 = time.perf_counter()
        entry, where = load(self.folder, self.key())
        parallel_model = None
        if entry is not None:
            try:
                parallel_model = build_parallel_module(model, entry, spec.mesh)
            except Exception as e:  # an entry that cannot be rebuilt costs a cold start only
                where = f"{where} not usable ({type(e).__name__}: {e})"
        # Every rank must run the graphs of one start: a rank without a usable entry traces
        # and schedules its collectives anew, so then every rank does.
        usable = 0.0 if parallel_model is None else 1.0
        if agree_across_ranks(usable, device=spec.mesh.device_type) < 1.0:
            log = logger.warning if entry is not None and parallel_model is None else logger.info
            if parallel_model is not None:
                where = "another rank has no usable entry"
            log(f"AutoParallel: graph cache miss ({where}): tracing")
            return None
        if spec.mesh.ndim != 1:
            # AutoParallel's apply creates the flattened mesh's process group, which the
            # cached collectives may name; new_group is collective, so only once every rank
            # takes this path.
            spec.mesh._flatten()
        times.graph_cache_load = time.perf_counter() - t0
        logger.info(
            f"AutoParallel: graph cache hit ({where}): no trace, solve or apply; loaded in "
            f"{times.graph_cache_load:.1f}s"
        )
        return parallel_model, entry.report

    def save(
        self, captured: dict, autop, parallel_model: nn.Module, *, report, times: PhaseTimes
    ) -> None:
        """Save the cold start's entry; a failure is a warning (the run trains as well)."""
        if "compiled" not in captured:
            return  # serializable_compile could not serialize (it said why)
        t0 = time.perf_counter()
        try:
            entry = make_entry(
                key=self.key(),
                captured=captured,
                autop=autop,
                parallel_model=parallel_model,
                input_placement=self.spec.input_placement,
                report=report,
            )
            path = save(self.folder, entry)
        except Exception as e:  # the run trains as well without a cache entry
            logger.warning(f"AutoParallel: graph cache not saved ({type(e).__name__}: {e})")
            return
        times.graph_cache_save = time.perf_counter() - t0
        logger.info(
            f"AutoParallel: graph cache saved to {path} ({os.path.getsize(path) / 2**20:.1f} "
            f"MiB, {times.graph_cache_save:.1f}s)"
        )
