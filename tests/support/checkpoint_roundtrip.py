"""DCP checkpoints between the AutoParallel model and the eager model, with aliases.

Run by tests/test_checkpoint.py in a subprocess (it installs process-wide patches and
process groups the pytest process must not keep):

    python -m tests.support.checkpoint_roundtrip WORKDIR [--config NAME] [--ranks 2] [--layers 2]
        [--flag=--parallelism.expert_parallel_degree --flag=2 ...]

1. eager (this process, no process group): torchtitan's model built as the Trainer builds
   it on one rank (meta, ``to_empty``, ``init_weights``), saved with DCP under WORKDIR/eager;
2. AutoParallel (``--ranks`` spawned gloo ranks): the parallel model built through
   ``AliasAwareAutoParallel`` as the Trainer builds it, initialized with another seed, saved
   under WORKDIR/autoparallel, then WORKDIR/eager loaded into it;
3. eager again: a fresh model (a third seed) loads WORKDIR/autoparallel.

Every save and load uses the state dict torchtitan's checkpointer saves for the model
(``ModelWrapper``: ``model.state_dict()``, where the fused wqkv's hooks split it into
wq/wk/wv), with ``torch.distributed.checkpoint``. Each step writes what it observed to
WORKDIR/results.json; the test asserts on it. Nothing here asserts, so that one run reports
every check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

CONFIG = "llama3_debugmodel_shared_rope_autoparallel"
TIED = ("tok_embeddings.weight", "lm_head.weight")
# Two of the debug model's 6 layers: every kind of state (tied embeddings, a RoPE cache
# shared by the layers, fused wqkv) at a third of the tracing time.
LAYERS = 2
SEEDS = {"eager": 1, "autoparallel": 2, "eager_reload": 3}


_START = time.perf_counter()


def _progress(message: str) -> None:
    print(
        f"[roundtrip {time.perf_counter() - _START:5.1f}s] {message}", file=sys.stderr, flush=True
    )


def _parse(spec: tuple[str, int, list[str]]):
    """The named config with trainer flags, keeping its first ``layers`` transformer layers
    (0: all)."""
    from torchtitan.config import ConfigManager

    config_name, layers, flags = spec
    config = ConfigManager().parse_args(
        ["--module", "config_registry", "--config", config_name, *flags]
    )
    if layers:
        config.model_spec.model.layers = config.model_spec.model.layers[:layers]
    return config


def _full(value: torch.Tensor) -> torch.Tensor:
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().clone()


def _local(value: torch.Tensor) -> torch.Tensor:
    return value.to_local() if isinstance(value, DTensor) else value


def _same_object_groups(module: torch.nn.Module, kind: str) -> list[list[str]]:
    """FQNs that name one object, per object named more than once (remove_duplicate=False)."""
    named = (
        module.named_parameters(remove_duplicate=False)
        if kind == "parameter"
        else module.named_buffers(remove_duplicate=False)
    )
    by_id: dict[int, list[str]] = {}
    for fqn, tensor in named:
        by_id.setdefault(id(tensor), []).append(fqn)
    return sorted(sorted(fqns) for fqns in by_id.values() if len(fqns) > 1)


def _alias_report(module: torch.nn.Module, alias_map) -> dict:
    """What the test checks about aliases on a module after a load."""
    state = module.state_dict()
    tied_storage = _local(state[TIED[0]]).untyped_storage().data_ptr() == (
        _local(state[TIED[1]]).untyped_storage().data_ptr()
    )
    verify = "ok"
    try:
        alias_map.verify(module)
    except Exception as e:  # AliasError; reported, asserted by the test
        verify = f"{type(e).__name__}: {e}"
    return {
        "tied_parameters_one_object": module.get_parameter(TIED[0])
        is module.get_parameter(TIED[1]),
        "tied_state_dict_one_storage": tied_storage,
        "parameter_groups": _same_object_groups(module, "parameter"),
        "buffer_groups": _same_object_groups(module, "buffer"),
        "verify": verify,
    }


def _compare(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict:
    """Keys and values of a (possibly sharded) state dict against full expected values."""
    keys, expected_keys = sorted(state), sorted(expected)
    differing, max_abs = [], 0.0
    for key in sorted(set(keys) & set(expected_keys)):
        got = _full(state[key])
        want = expected[key]
        if got.shape != want.shape or not torch.equal(got, want):
            differing.append(key)
            if got.shape == want.shape:
                max_abs = max(max_abs, (got.float() - want.float()).abs().max().item())
    return {
        "keys": keys,
        "missing": sorted(set(expected_keys) - set(keys)),
        "unexpected": sorted(set(keys) - set(expected_keys)),
        "differing": differing,
        "max_abs_diff": max_abs,
    }


def _changed_by_load(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    """The loaded values differ from the module's own init (so the load did something)."""
    return any(not torch.equal(before[k], after[k]) for k in before if k in after)


def _checkpoint_keys(path: Path) -> list[str]:
    reader = dcp.FileSystemReader(str(path))
    return sorted(reader.read_metadata().state_dict_metadata)


def _checkpoint_tied_values_equal(path: Path) -> bool:
    """Read the two tied names into separate tensors: the checkpoint holds one value."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    plain = {k: torch.empty(metadata[k].size, dtype=metadata[k].properties.dtype) for k in TIED}
    dcp.load(plain, checkpoint_id=str(path), no_dist=True)
    return torch.equal(plain[TIED[0]], plain[TIED[1]])


# --- eager: one process, no process group ---


def _build_eager(config, seed: int):
    from torchtitan_ext.aliases import AliasMap

    config.model_spec.model.update_from_config(config=config)
    with torch.device("meta"):
        model = config.model_spec.model.build()
    alias_map = AliasMap.capture(model)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model, alias_map


def _eager_save(workdir: Path, spec: tuple[str, int, list[str]]) -> dict:
    from torchtitan.components.checkpoint import ModelWrapper

    model, alias_map = _build_eager(_parse(spec), SEEDS["eager"])
    state = ModelWrapper(model).state_dict()
    dcp.save(state, checkpoint_id=str(workdir / "eager"), no_dist=True)
    torch.save({k: _full(v) for k, v in state.items()}, workdir / "eager_values.pt")
    return {"saved_keys": sorted(state), "aliases": _alias_report(model, alias_map)}


def _eager_load(workdir: Path, spec: tuple[str, int, list[str]]) -> dict:
    from torchtitan.components.checkpoint import ModelWrapper

    model, alias_map = _build_eager(_parse(spec), SEEDS["eager_reload"])
    wrapper = ModelWrapper(model)
    before = {k: _full(v) for k, v in wrapper.state_dict().items()}
    state = wrapper.state_dict()
    dcp.load(state, checkpoint_id=str(workdir / "autoparallel"), no_dist=True)
    wrapper.load_state_dict(state)
    after = model.state_dict()
    expected = torch.load(workdir / "autoparallel_values.pt")
    return {
        "compare": _compare(after, expected),
        "load_changed_values": _changed_by_load(before, {k: _full(v) for k, v in after.items()}),
        "aliases": _alias_report(model, alias_map),
    }


# --- AutoParallel: spawned gloo ranks ---


def _build_autoparallel(config, world_size: int, dump_folder: Path):
    """The parallel model as our Trainer builds it (plan_model), with its component."""
    from torchtitan_ext.parallelize import plan_model

    _, parallel, component = plan_model(config, world_size=world_size, dump_folder=str(dump_folder))
    return parallel, component


def _autoparallel_rank(
    rank: int, world_size: int, workdir: Path, spec: tuple[str, int, list[str]]
) -> None:
    from torchtitan.components.checkpoint import ModelWrapper

    torch.set_num_threads(1)  # one core per rank, as torchrun's OMP_NUM_THREADS=1
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir / 'pg_store'}", rank=rank, world_size=world_size
    )
    try:
        config = _parse(spec)
        model, component = _build_autoparallel(config, world_size, workdir / "dump")
        model.to_empty(device="cpu")
        torch.manual_seed(SEEDS["autoparallel"])
        with torch.no_grad():
            model.init_weights(buffer_device=None)
        wrapper = ModelWrapper(model)
        _progress(f"rank {rank}: parallel model built and initialized")
        state = wrapper.state_dict()
        values = {k: _full(v) for k, v in state.items()}  # collective: every rank
        dcp.save(state, checkpoint_id=str(workdir / "autoparallel"))
        if rank == 0:
            torch.save(values, workdir / "autoparallel_values.pt")
        result = {
            "saved_keys": sorted(state),
            "placements": sorted(
                {str(tuple(p.placements)) for p in model.parameters() if isinstance(p, DTensor)}
            ),
            # MoE: the expert weights this rank holds, of all (rows = experts).
            "expert_rows": {
                fqn: [_local(p).shape[0], p.shape[0]]
                for fqn, p in model.named_parameters()
                if ".inner_experts." in fqn
            },
            "aliases_after_init": _alias_report(model, component.alias_map),
        }

        state = wrapper.state_dict()
        dcp.load(state, checkpoint_id=str(workdir / "eager"))
        wrapper.load_state_dict(state)
        after = {k: _full(v) for k, v in model.state_dict().items()}
        expected = torch.load(workdir / "eager_values.pt")
        result["load_eager"] = {
            "compare": _compare(model.state_dict(), expected),
            "load_changed_values": _changed_by_load(values, after),
            "aliases": _alias_report(model, component.alias_map),
        }
        (workdir / f"autoparallel_rank{rank}.json").write_text(json.dumps(result, indent=1))
    finally:
        dist.destroy_process_group()
    # A rank that finished can still abort in the interpreter's teardown under gloo
    # (pytorch/pytorch#179291, "terminate called without an active exception"; once in a
    # CI run here): end it first, as torchtitan_ext.cpu.skip_interpreter_teardown_after_success
    # does for training processes.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument(
        "--layers", type=int, default=LAYERS, help="keep the first N layers (0: all)"
    )
    parser.add_argument(
        "--flag", action="append", default=[], help="a trainer flag (repeat: --flag=--a --flag=1)"
    )
    args = parser.parse_args(argv)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHTITAN_EXT_DEVICE", "cpu")

    spec = (args.config, args.layers, args.flag)
    results: dict = {
        "config": args.config, "layers": args.layers, "ranks": args.ranks, "flags": args.flag
    }  # fmt: skip
    results["eager_save"] = _eager_save(workdir, spec)
    _progress("eager model saved")
    mp.spawn(_autoparallel_rank, args=(args.ranks, workdir, spec), nprocs=args.ranks, join=True)
    results["autoparallel"] = [
        json.loads((workdir / f"autoparallel_rank{r}.json").read_text()) for r in range(args.ranks)
    ]
    _progress("AutoParallel ranks saved and loaded")
    results["eager_load"] = _eager_load(workdir, spec)
    _progress("eager model loaded")
    results["checkpoint_keys"] = {
        name: _checkpoint_keys(workdir / name) for name in ("eager", "autoparallel")
    }
    results["checkpoint_tied_values_equal"] = {
        name: _checkpoint_tied_values_equal(workdir / name) for name in ("eager", "autoparallel")
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    _progress("results written")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
