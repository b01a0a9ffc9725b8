"""How AutoParallel's cold start grows with model depth and mesh size.

Each point plans a config on a fake process group of a given size, in a fresh process, on
the meta device: tracing, solving and applying need no communication and no weights, so a
fake group stands in for real ranks, and models too large for this machine plan here. The
layer sweep uses the llama3 debug config (tied embeddings) with a given number of layers;
the named points are full configs (Llama 3 8B, Qwen3 0.6B, the MoE configs with expert
parallelism).

    python -m benchmarks.scaling --layers 4 --mesh 8     # one point, prints JSON
    python -m benchmarks.scaling --config qwen3_30b_a3b_autoparallel --mesh 64 --ep 8
    python -m benchmarks.scaling --named    # every named point: results/cold-start.{json,md}

Compiled configs report Inductor's compile of AutoParallel's graphs (at apply, on fake
tensors) as its own phase, ``compile``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEBUG_CONFIG = "llama3_debugmodel_autoparallel"
LAYERS = (2, 4, 8)
MESHES = (2, 4, 8)
# (config, fake ranks, expert_parallel_degree): the sizes, and the MoE configs.
NAMED = (
    (DEBUG_CONFIG, 8, 1),
    (DEBUG_CONFIG, 64, 1),
    ("qwen3_0_6b_autoparallel", 8, 1),
    ("qwen3_0_6b_autoparallel", 64, 1),
    ("llama3_8b_autoparallel", 8, 1),
    ("llama3_8b_autoparallel", 64, 1),
    ("qwen3_30b_a3b_autoparallel", 64, 8),
    ("deepseek_v3_16b_autoparallel", 64, 8),
)


def plan_point(config_name: str, *, mesh: int, layers: int | None = None, ep: int = 1) -> dict:
    """Plan one config on ``mesh`` fake ranks (FSDP over all of them; with ``ep`` > 1,
    experts on ep of them); ``layers`` cuts or repeats the config's layers."""
    import tempfile

    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import config_registry
    from torchtitan_ext.parallelize import plan_model

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=mesh)
    config = getattr(config_registry, config_name)()
    config.parallelism.expert_parallel_degree = ep
    # The plan is for a mesh of `mesh` ranks, whatever the config's own degrees.
    config.parallelism.data_parallel_shard_degree = -1
    config.parallelism.data_parallel_replicate_degree = 1
    config.parallelism.tensor_parallel_degree = 1
    config.parallelism.pipeline_parallel_degree = 1
    model_config = config.model_spec.model
    if layers is not None:
        model_config.layers = [
            model_config.layers[i % len(model_config.layers)] for i in range(layers)
        ]
    _, _, component = plan_model(config, world_size=mesh, dump_folder=tempfile.mkdtemp())
    times = component.times
    return {
        "config": config_name,
        "layers": len(model_config.layers),
        "mesh": mesh,
        "ep": ep,
        "trace": times.trace,
        "solve": times.solve,
        "apply": times.apply,
        "compile": times.compile,
        # Whether the collectives below were read from Inductor's graphs: not when its
        # backward compiles only at the first step (an expert-parallel plan).
        "compiled_plan": component.report.compiled,
        "experts": component.report.experts,
        # Expert parallelism: how many expert gradients the plan reduces each way.
        "expert_gradients": dict(Counter(component.report.expert_gradients.values())),
        "forward_flop_share": component.report.forward_flop_share,
        "matmul_batch_share": component.report.matmul_batch_share,
        "collectives": {k: s.count for k, s in component.report.collectives.items()},
    }


def _run_point(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scaling", *args],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"scaling point {' '.join(args)}:\n{proc.stderr[-4000:]}")
    point = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"scaling: {point}", flush=True)
    return point


def scaling_table() -> list[dict]:
    """Every (layers, mesh) point of the debug model, each in its own process."""
    return [
        _run_point(["--layers", str(layers), "--mesh", str(mesh)])
        for layers in LAYERS
        for mesh in MESHES
    ]


def named_table(done: list[dict]) -> list[dict]:
    """Every named (config, fake ranks, ep) point, each in its own process; points in
    ``done`` (an earlier run's) are kept, not measured again (a large MoE point takes
    minutes)."""
    by_point = {(p["config"], p["mesh"], p["ep"]): p for p in done}
    return [
        by_point.get((name, mesh, ep))
        or _run_point(["--config", name, "--mesh", str(mesh), "--ep", str(ep)])
        for name, mesh, ep in NAMED
    ]


def named_markdown(points: list[dict]) -> str:
    import platform

    import config_registry

    lines = [
        f"Cold start on fake ranks (one process, meta device), {platform.machine()}, "
        f"{os.cpu_count()} cores; `python -m benchmarks.scaling --named`. FSDP over every "
        "fake rank (with ep > 1: experts on ep, sharded further on efsdp); configs whose "
        "tokenizer is absent plan with the bundled one's vocabulary (2048).",
        "",
        "| config | layers | fake ranks | ep | trace (s) | solve (s) | apply (s) | total (s) "
        "| compile (s) | experts per rank | collectives per step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        if not getattr(config_registry, p["config"])().compile.enable:
            compile_s, form = "", "after eager bucketing"
        elif "compile" not in p:
            # Measured before Inductor compiled at apply (2026-12-04): it compiled at step 1.
            compile_s, form = "at step 1", "planned, bucketed at step 1 by Inductor"
        elif p["compiled_plan"]:
            compile_s, form = f"{p['compile']:.1f}", "after Inductor's bucketing"
        else:
            compile_s, form = f"{p['compile']:.1f}", "planned; the backward compiles at step 1"
        experts = f"{p['experts'][0]} of {p['experts'][1]}" if p["experts"] else ""
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(p["collectives"].items()))
        kinds += f" ({form})"
        lines.append(
            f"| {p['config']} | {p['layers']} | {p['mesh']} | {p['ep']} | {p['trace']:.1f} "
            f"| {p['solve']:.1f} | {p['apply']:.1f} "
            f"| {p['trace'] + p['solve'] + p['apply']:.1f} | {compile_s} | {experts} | {kinds} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=DEBUG_CONFIG, help="a config of config_registry")
    parser.add_argument("--layers", type=int, help="cut or repeat the config's layers")
    parser.add_argument("--mesh", type=int, help="fake ranks")
    parser.add_argument("--ep", type=int, default=1, help="expert_parallel_degree")
    parser.add_argument(
        "--named", action="store_true", help="every named point, each in a process, as a table"
    )
    parser.add_argument(
        "--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "cold-start",
        help="with --named: writes OUTPUT.json and OUTPUT.md; points already there are kept",
    )  # fmt: skip
    parser.add_argument("--fresh", action="store_true", help="with --named: measure every point")
    args = parser.parse_args()
    if args.named:
        results = args.output.with_suffix(".json")
        done = [] if args.fresh or not results.exists() else json.loads(results.read_text())
        points = named_table(done)
        table = named_markdown(points)
        results.write_text(json.dumps(points, indent=2))
        args.output.with_suffix(".md").write_text(table)
        print(table)
        return
    if args.mesh is None:
        parser.error("--mesh is required (or --named)")
    print(json.dumps(plan_point(args.config, mesh=args.mesh, layers=args.layers, ep=args.ep)))


if __name__ == "__main__":
    main()
