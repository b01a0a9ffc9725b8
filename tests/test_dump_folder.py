"""Files the AutoParallel component writes in the dump folder are written whole or not at
all: a write that fails midway (a full disk) leaves the previous file, or none."""

from __future__ import annotations

import builtins
import errno
import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

OLD = "the previous run's file\n"
KEY = {"model": "this one", "mesh": {"dp_shard": 2}}


class _FullDisk:
    """A file whose first write stores half its data, then fails as a full disk does. No
    fileno(): shutil.copyfile then copies through write() too."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _fail_writes_to(monkeypatch, folder, name: str) -> None:
    """Files opened for writing in ``folder`` whose name holds ``name`` (the file, or a
    temporary file of it) take half a write, then fail."""
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        path = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
        hit = os.path.dirname(os.path.abspath(path)) == str(folder)
        if "w" in mode and hit and name in os.path.basename(path):
            return _FullDisk(f)
        return f

    monkeypatch.setattr(builtins, "open", open_)


@pytest.fixture
def dump(tmp_path, monkeypatch):
    """<tmp>/autoparallel, the component's dump folder, written on rank 0 (no process
    group); AutoParallel's save_placements run on a solution of no nodes."""
    import autoparallel.serialization

    dump = str(tmp_path / "autoparallel")
    os.makedirs(dump)
    monkeypatch.setattr(autoparallel.serialization, "load_placements", lambda *_: "loaded")
    return dump


def _autop():
    optimizer = SimpleNamespace(
        _extract_and_validate_solution=dict,
        mesh=SimpleNamespace(shape=(2,), mesh_dim_names=("dp_shard",)),
        get_log=lambda colored: "one line per graph node\n" * 50,
        graph=torch.fx.Graph(),  # no parameter nodes
    )
    return SimpleNamespace(
        optimize_placement=lambda: "solved",
        sharding_optimizer=optimizer,
        mesh=SimpleNamespace(size=lambda: 1),  # one rank: it solves
    )


def _solve(dump, placement_file: str = ""):
    from torchtitan_ext.parallelize.placements import solve_or_load

    return solve_or_load(
        _autop(), loads=bool(placement_file) and os.path.exists(placement_file),
        path=placement_file, key=KEY, parameters={}, dump=dump, dump_placements=True, writes=True,
    )  # fmt: skip


def _init_weights(dump):
    from torchtitan_ext.parallelize.report import PhaseTimes, write_startup

    write_startup(dump, PhaseTimes(), nn.Linear(2, 2), writes=True)


def _write_plan(dump):
    from torchtitan_ext.parallelize.report import PlanReporter

    report = SimpleNamespace(to_json=lambda: json.dumps({"plan": "new"}), lines=lambda: [])
    PlanReporter(dump, writes=True).publish(report, source="a test")


def _placement_file(tmp_path) -> str:
    path = tmp_path / "placements.json"
    body = {"placements": {}, "torchtitan_ext_parameters": {}}
    path.write_text(json.dumps({**body, "torchtitan_ext_plan_key": KEY}))
    return str(path)


# (folder, file name, what writes it): the file is there before (OLD) unless noted.
WRITES = {
    # Written only when missing (else it is loaded): no file before, none after.
    "placement file": (
        "", "placements.json", lambda dump, tmp: _solve(dump, str(tmp / "placements.json")),
    ),
    "dumped placements": ("autoparallel", "placements.json", lambda dump, tmp: _solve(dump)),
    "dumped placements, loaded": (
        "autoparallel", "placements.json", lambda dump, tmp: _solve(dump, _placement_file(tmp)),
    ),
    "solution.txt": ("autoparallel", "solution.txt", lambda dump, tmp: _solve(dump)),
    "plan.json": ("autoparallel", "plan.json", lambda dump, tmp: _write_plan(dump)),
    "startup.json": ("autoparallel", "startup.json", lambda dump, tmp: _init_weights(dump)),
}  # fmt: skip


@pytest.mark.engine
@pytest.mark.parametrize("case", list(WRITES))
def test_a_write_that_fails_midway_leaves_the_previous_file(case, dump, tmp_path, monkeypatch):
    folder_name, name, write = WRITES[case]
    folder = tmp_path / folder_name
    target = folder / name
    before = case != "placement file"
    if before:
        target.write_text(OLD)
    write(dump, tmp_path)  # once as it works: the files it writes besides the target
    if before:
        target.write_text(OLD)
    else:
        target.unlink()
    files = sorted(os.listdir(folder))
    _fail_writes_to(monkeypatch, folder, name)
    with pytest.raises(OSError, match="injected"):
        write(dump, tmp_path)
    assert sorted(os.listdir(folder)) == files  # no partial file, no temporary one
    if before:
        assert target.read_text() == OLD
