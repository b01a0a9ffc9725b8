"""The solve, or a placement file instead of it: AutoParallel's placements saved with the
plan key they were solved for (plan_key), checked before they are used; and the placement
dumps (--autoparallel.dump_placements).
"""

from __future__ import annotations

import json
import os
import shutil

from torchtitan.tools.logging import logger

from torchtitan_ext.dump_folder import write_whole, written_whole
from torchtitan_ext.ranks import is_rank0

_PLAN_KEY_FIELD = "torchtitan_ext_plan_key"


def solve_or_load(autop, *, path: str, key: dict, dump: str, dump_placements: bool):
    """Solve, or load the placement file ``path`` (after checking it was solved for ``key``);
    save the solution to ``path`` and, with ``dump_placements``, to ``dump``. Returns the
    placement AutoParallel's apply takes."""
    from autoparallel.serialization import load_placements, save_placements

    solved = not (path and os.path.exists(path))
    if solved:
        placement = autop.optimize_placement()
    else:
        check_placement_file(path, key)
        placement = load_placements(autop.sharding_optimizer, path)
        logger.info(f"AutoParallel: loaded placements from {path} (no solve)")
    if not is_rank0():
        return placement
    os.makedirs(dump, exist_ok=True)
    # Each file is replaced whole, AutoParallel's placements and our key in one write.
    if solved and path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with written_whole(path) as tmp:
            save_placements(autop.sharding_optimizer, tmp)
            _add_plan_key(tmp, key)
        logger.info(f"AutoParallel: saved placements to {path}")
    dumped = os.path.join(dump, "placements.json")
    if dump_placements and solved:
        with written_whole(dumped) as tmp:
            save_placements(autop.sharding_optimizer, tmp)
            _add_plan_key(tmp, key)
        log = autop.sharding_optimizer.get_log(colored=False)
        write_whole(os.path.join(dump, "solution.txt"), log)
    elif dump_placements:
        with written_whole(dumped) as tmp:
            shutil.copyfile(path, tmp)
    return placement


def _add_plan_key(path: str, key: dict) -> None:
    # AutoParallel's load_placements reads only its own fields and ignores this one. Called
    # on the temporary file save_placements wrote, before it replaces the placement file.
    with open(path) as f:
        data = json.load(f)
    data[_PLAN_KEY_FIELD] = key
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def check_placement_file(path: str, key: dict) -> None:
    """ValueError unless the placement file was solved for this plan (plan_key)."""
    fix = "delete it to solve again, or pass another --autoparallel.placement_file"
    try:
        with open(path) as f:
            saved = json.load(f).get(_PLAN_KEY_FIELD)
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"placement file {path} is not readable JSON ({e}): {fix}") from e
    if saved is None:
        raise ValueError(
            f"placement file {path} has no torchtitan_ext plan key (not saved by this "
            f"project's --autoparallel.placement_file), so it cannot be checked: {fix}"
        )
    differ = [name for name in key if saved.get(name) != key[name]]
    if differ:
        was = ", ".join(f"{name} {saved.get(name)}" for name in differ)
        now = ", ".join(f"{name} {key[name]}" for name in differ)
        raise ValueError(f"placement file {path} was solved for {was}; this run has {now}: {fix}")
