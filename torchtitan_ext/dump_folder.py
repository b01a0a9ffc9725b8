"""What a run does to its dump folder: one run at a time, files written whole, and a
checkpoint to resume from that can be read.

One run per folder: the launcher holds ``<dump_folder>/.torchtitan_ext.lock`` (``flock``,
exclusive) from before its ranks start until it exits; the file names the holder (pid,
host, start time). Another run on the folder is refused, naming the holder. The kernel
releases the lock of a process that died, so a lock file that is there but not locked was
left by a dead run: it is taken over, with a warning naming that run. A run that exits
removes the file while it still holds the lock.

Files written whole: ``written_whole`` and ``write_whole`` write a temporary file in the
same folder, fsync it and rename it over the target, so a reader, a crash or a failed
write sees the old file or the new one, never part of one.

Resuming: with ``--checkpoint.enable`` torchtitan resumes from the highest ``step-N``
folder under ``<dump_folder>/<checkpoint.folder>`` that holds DCP's ``.metadata`` (or a
HuggingFace index), and DCP writes ``.metadata`` last. A folder without it (a save killed
midway) is skipped, and the run resumes from the step before: nothing to check. A
``.metadata`` that is there but empty or unreadable (truncated) is picked all the same, and
every rank then fails in DCP's load. ``check_resume`` refuses that run before any rank
starts, naming the broken folder and the newest intact step. It does not fall back to that
step on its own: the run would silently redo the steps after it, and the broken folder
would stay the one the next run picks. The user chooses: ``--checkpoint.load_step N``, or
moving the broken folder out of the checkpoint folder. An explicit ``load_step``, a seed
checkpoint run and remote (fsspec) checkpoint folders are not checked.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import socket
from collections.abc import Callable, Iterator

LOCK_NAME = ".torchtitan_ext.lock"


@contextlib.contextmanager
def run_lock(folder: str, *, warn: Callable[[str], None]) -> Iterator[None]:
    """Hold ``folder``'s run lock for the block. ValueError naming the holder and the fix
    when another run holds it; ``warn`` is called with one line when a dead run's lock
    file is taken over. The folder must exist."""
    path = os.path.join(folder, LOCK_NAME)
    fd, stale = _take(path, folder=folder)
    try:
        if stale is not None:
            warn(
                f"taking over {path}, left by a run that ended without removing it "
                f"({_describe(stale)}; killed, or its machine went down)"
            )
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(sep=" ", timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        # Removed while still held: a run that opened this file meanwhile finds it gone
        # once it gets the lock, and takes a new one (_take).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _take(path: str, *, folder: str) -> tuple[int, dict | None]:
    """The locked file descriptor of ``path``, and what a dead holder left in it (None
    for a new file)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise ValueError(
                f"--dump_folder {folder} is in use by another run ({_describe(holder)}, "
                f"holding {path}): wait for it to finish or stop it, or pass another "
                "--dump_folder"
            ) from None
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            return fd, _read(fd) if os.fstat(fd).st_size else None
        os.close(fd)  # its holder exited and removed it after we opened it


def _read(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if "pid" not in holder:
        return "pid not recorded"  # being written, or cut short by a crash
    return f"pid {holder['pid']} on host {holder.get('host')}, started {holder.get('started')}"


@contextlib.contextmanager
def written_whole(path: str) -> Iterator[str]:
    """A temporary path in ``path``'s folder for the block to write; once the block
    returns, the file is fsynced and renamed over ``path``. If the block raises, ``path``
    is left as it was and the temporary file is removed."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the block may have written it through its own file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    # The rename itself survives a crash once the folder is synced.
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_whole(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (written_whole)."""
    with written_whole(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def check_resume(checkpoint, *, dump_folder: str) -> None:
    """ValueError when the checkpoint torchtitan would resume from has a ``.metadata``
    DCP cannot read (see the module docstring); ``checkpoint`` is the run's
    ``config.checkpoint``."""
    if (
        not checkpoint.enable
        or checkpoint.create_seed_checkpoint
        or checkpoint.load_step != -1
        or "://" in dump_folder + checkpoint.folder
    ):
        return
    folder = os.path.join(dump_folder, checkpoint.folder)
    broken: list[str] = []  # newest first, until an intact step
    problem = intact = None
    for step in _resumable_steps(folder):
        why = _unreadable_metadata(os.path.join(folder, f"step-{step}"))
        if why is None:
            intact = step
            break
        problem = problem or why
        broken.append(f"step-{step}")
    if not broken:
        return
    also = f" (broken too: {', '.join(broken[1:])})" if broken[1:] else ""
    refusal = (
        f"checkpoint {folder}/{broken[0]} has {problem}: torchtitan would resume from it "
        f"and fail on every rank{also}.\n"
    )
    move = f"move {', '.join(broken)} out of {folder}"
    if intact is None:
        raise ValueError(refusal + f"No older step is intact: {move} to start without them")
    raise ValueError(
        refusal + f"The newest intact step is step-{intact}: pass --checkpoint.load_step "
        f"{intact} to resume from it, or {move}"
    )


def _resumable_steps(folder: str) -> list[int]:
    """The steps torchtitan 0.3.0's CheckpointManager._find_load_step considers, newest
    first: ``step-N`` folders with a DCP ``.metadata`` or a HuggingFace index."""
    if not os.path.isdir(folder):
        return []
    steps = []
    for name in os.listdir(folder):
        match = re.search(r"step-(\d+)", name)
        path = os.path.join(folder, name)
        if match and any(
            os.path.isfile(os.path.join(path, f))
            for f in (".metadata", "model.safetensors.index.json")
        ):
            steps.append(int(match.group(1)))
    return sorted(set(steps), reverse=True)


def _unreadable_metadata(path: str) -> str | None:
    """Why DCP cannot load the checkpoint folder ``path`` by its ``.metadata``, or None
    (also when it has none: torchtitan then loads a HuggingFace index, or skips it)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata

    metadata = os.path.join(path, ".metadata")
    if not os.path.isfile(metadata):
        return None
    if os.path.getsize(metadata) == 0:
        return "an empty .metadata"
    try:
        # What dcp.load reads first.
        loaded = FileSystemReader(path).read_metadata()
    except Exception as e:  # truncated or foreign: whatever unpickling raises
        return f"an unreadable .metadata ({type(e).__name__}: {e})"
    if not isinstance(loaded, Metadata):
        return f"a .metadata that is not DCP's (a {type(loaded).__name__})"
    return None
