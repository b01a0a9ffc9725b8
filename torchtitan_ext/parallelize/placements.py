"""The solve, or a placement file instead of it: AutoParallel's placements saved with the
plan key they were solved for (plan_key) and the parameters they place, checked before they
are used; and the placement dumps (--autoparallel.dump_placements).

Every rank of a mesh traces the same graph and would solve the same ILP: one rank solves
(the one that writes the start's files, the mesh's first) and sends the others its
placements in the placement file's form, which each matches to its own strategies as it
would a file's, so every rank applies the same plan without the solve.

A placement file is AutoParallel's (graph node name -> output and input placements, e.g.
"S(0)R" on a 2-D mesh) with two fields of ours: the plan key, and each parameter node's FQN
and rank (number of dims). AutoParallel's load_placements ignores them. The check compares
the key, then each parameter's name and rank with the model's, and each parameter's placement
with its rank: an edited body is refused before any rank starts, not by a traceback on each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch.distributed as dist
from torchtitan.tools.logging import logger

from torchtitan_ext.dump_folder import write_whole, written_whole

_PLAN_KEY_FIELD = "torchtitan_ext_plan_key"
_PARAMETERS_FIELD = "torchtitan_ext_parameters"
# One placement per mesh axis in AutoParallel's strings: Shard(dim), Replicate, Partial.
_PLACEMENT = re.compile(r"S\((\d+)\)|R|P(\([a-z_]*\))?")


def solve_or_load(
    autop,
    *,
    loads: bool,
    path: str,
    key: dict,
    parameters: dict[str, int],
    dump: str,
    dump_placements: bool,
    writes: bool,
):
    """With ``loads``, load the placement file ``path`` (after checking it against ``key``
    and ``parameters``, FQN -> rank); else solve on the rank that ``writes`` (the mesh's
    first) and receive its solution on the others. The solving rank saves the solution to
    ``path`` and, with ``dump_placements``, to ``dump``. Returns the placement AutoParallel's
    apply takes."""
    from autoparallel.serialization import load_placements

    if loads:
        check_placement_file(path, key, parameters=parameters)
        placement = load_placements(autop.sharding_optimizer, path)
        logger.info(f"AutoParallel: loaded placements from {path} (no solve)")
        if writes and dump_placements:
            os.makedirs(dump, exist_ok=True)
            with written_whole(os.path.join(dump, "placements.json")) as tmp:
                shutil.copyfile(path, tmp)
        return placement
    placement, solved = _solve_on_one_rank(autop, solver=writes)
    if not writes:
        return placement
    # The text the others received, with our fields: each file is replaced whole.
    text = _with_our_fields(solved, key, autop.sharding_optimizer.graph)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_whole(path, text)
        logger.info(f"AutoParallel: saved placements to {path}")
    if dump_placements:
        os.makedirs(dump, exist_ok=True)
        write_whole(os.path.join(dump, "placements.json"), text)
        log = autop.sharding_optimizer.get_log(colored=False)
        write_whole(os.path.join(dump, "solution.txt"), log)
    return placement


def _solve_on_one_rank(autop, *, solver: bool) -> tuple[object, str | None]:
    """The solve on the mesh's first rank (``solver``); the mesh's other ranks receive its
    placements, or its error, and match them to their strategies. A rank whose graph
    differs from the solver's cannot match them and stops, naming the node. Returns the
    placement and, on the solver, its placements as AutoParallel's save_placements writes
    them (what the others received)."""
    from autoparallel.serialization import load_placements, save_placements
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    mesh = autop.mesh
    group = None
    if mesh.size() > 1:
        # The group and the broadcast's tensors are real; AutoParallel's fake mode is active.
        with unset_fake_temporarily():
            group = (mesh if mesh.ndim == 1 else mesh._flatten()).get_group()
    solver = solver or group is None
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "placements.json")
        # [placement file text, or the solver's error]
        sent: list[str | None] = [None, None]
        try:
            if solver:
                placement = autop.optimize_placement()
                save_placements(autop.sharding_optimizer, path)
                with open(path) as f:
                    sent[0] = f.read()
        except Exception as e:
            sent[1] = f"{type(e).__name__}: {e}"
            raise
        finally:
            # The others wait here for the solution: they receive the error, not a timeout.
            if group is not None:
                with unset_fake_temporarily():
                    dist.broadcast_object_list(sent, group=group, group_src=0)
        if solver:
            return placement, sent[0]
        if sent[1] is not None:
            raise RuntimeError(f"the mesh's first rank failed to solve: {sent[1]}")
        with open(path, "w") as f:
            f.write(sent[0])
        try:
            placement = load_placements(autop.sharding_optimizer, path)
        except RuntimeError as e:
            raise RuntimeError(
                f"rank {dist.get_rank()} traced another graph than the mesh's first rank, "
                f"whose placements it received ({e}); every rank must build the same model "
                "from the same config"
            ) from e
    logger.info("AutoParallel: placements from the mesh's first rank (no solve here)")
    return placement, None


def _with_our_fields(text: str, key: dict, graph) -> str:
    """AutoParallel's placement file ``text`` with ours: the key, and each parameter node's
    FQN and rank."""
    from torch._functorch._aot_autograd.fx_utils import get_named_param_nodes

    data = json.loads(text)
    data[_PLAN_KEY_FIELD] = key
    data[_PARAMETERS_FIELD] = {
        node.name: {"fqn": fqn, "rank": node.meta["val"].dim()}
        for fqn, node in get_named_param_nodes(graph).items()
    }
    return json.dumps(data, indent=2)


def check_placement_file(path: str, key: dict, *, parameters: dict[str, int]) -> None:
    """ValueError unless the placement file was solved for this plan (plan_key) and places
    this model's parameters (``parameters``: FQN -> rank) with placements of their rank."""
    fix = "delete it to solve again, or pass another --autoparallel.placement_file"
    try:
        with open(path) as f:
            data = json.load(f)
        saved = data.get(_PLAN_KEY_FIELD)
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
    problems = _body_problems(data, parameters=parameters, mesh_ndim=len(key["mesh"]))
    if problems:
        shown = "; ".join(problems[:3]) + (
            f"; {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise ValueError(f"placement file {path} does not fit this model ({shown}): {fix}")


def _body_problems(data: dict, *, parameters: dict[str, int], mesh_ndim: int) -> list[str]:
    """What in the file's body contradicts the model: parameters it names that the model
    lacks or has with another rank, and parameter placements that do not fit their rank."""
    recorded = data.get(_PARAMETERS_FIELD)
    placements = data.get("placements")
    if not isinstance(recorded, dict) or not isinstance(placements, dict):
        return [f"no {_PARAMETERS_FIELD} or placements (saved by an older version)"]
    problems = []
    for node, entry in sorted(recorded.items()):
        try:
            fqn, rank = entry["fqn"], int(entry["rank"])
        except (TypeError, KeyError, ValueError):
            problems.append(f"parameter entry {node} is malformed")
            continue
        if fqn not in parameters:
            problems.append(f"{fqn} is not a parameter of this model")
        elif parameters[fqn] != rank:
            problems.append(f"{fqn} has {parameters[fqn]} dims, not {rank}")
        placed = placements.get(node)
        output = placed.get("output") if isinstance(placed, dict) else None
        if output is None:
            problems.append(f"{fqn} ({node}) has no placement")
            continue
        tokens = list(_PLACEMENT.finditer(output))
        if "".join(t.group(0) for t in tokens) != output or len(tokens) != mesh_ndim:
            problems.append(f"{fqn} ({node}): {output!r} is not {mesh_ndim} placement(s)")
        elif any(t.group(1) is not None and int(t.group(1)) >= rank for t in tokens):
            problems.append(f"{fqn} ({node}): {output!r} shards a dim a {rank}-dim tensor lacks")
    return problems
