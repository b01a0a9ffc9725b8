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
    python -m benchmarks.scaling --depth    # phases by depth: results/cold-start-depth.{json,md}
    torchrun --nproc-per-node 8 -m benchmarks.scaling --config deepseek_v3_16b_autoparallel \
        --ep 8 --layers 2           # real gloo ranks, each planning on the meta device

Compiled configs report Inductor's compile of AutoParallel's graphs (at apply, on fake
tensors) as its own phase, ``compile``.
"""

from __future__ import annotations

import argparse
import dataclasses
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

# (config, fake ranks, expert_parallel_degree): the large configs, planned at each of
# DEPTHS layers and at their full depth.
DEPTH_CONFIGS = (
    ("llama3_8b_autoparallel", 64, 1),
    ("deepseek_v3_16b_autoparallel", 64, 8),
    ("qwen3_30b_a3b_autoparallel", 64, 8),
)
DEPTHS = (2, 8, 16)
PHASES = ("trace", "solve", "apply", "compile")


def plan_point(
    config_name: str, *, mesh: int | None, layers: int | None = None, ep: int = 1
) -> dict:
    """Plan one config on ``mesh`` fake ranks (FSDP over all of them; with ``ep`` > 1,
    experts on ep of them); ``layers`` cuts or repeats the config's layers. Under torchrun
    (``mesh`` None): on its gloo ranks, each planning on the meta device."""
    import tempfile
    import time

    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import config_registry
    from torchtitan_ext.parallelize import plan_model

    if mesh is None:
        dist.init_process_group("gloo")
        mesh = dist.get_world_size()
    else:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=mesh)
    start = time.perf_counter()
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
    # Every rank's phases: on real ranks the start ends with the slowest.
    mine = {"wall": time.perf_counter() - start, **dataclasses.asdict(times)}
    ranks = [mine]
    if dist.get_backend() != "fake":
        ranks = [None] * mesh
        dist.all_gather_object(ranks, mine)
    return {
        "ranks": ranks,
        "wall": max(r["wall"] for r in ranks),
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


def depth_table(results: Path, *, fresh: bool) -> list[dict]:
    """Every DEPTH_CONFIGS config at each of DEPTHS layers and at its full depth, each in
    its own process, written to ``results`` as each point ends; unless ``fresh``, points
    already there are kept (a full-depth MoE point takes a quarter hour)."""
    import config_registry

    done = [] if fresh or not results.exists() else json.loads(results.read_text())
    by_point = {(p["config"], p["layers"]): p for p in done}
    points = []
    for name, mesh, ep in DEPTH_CONFIGS:
        full = len(getattr(config_registry, name)().model_spec.model.layers)
        for layers in (*DEPTHS, full):
            args = ["--config", name, "--mesh", str(mesh), "--ep", str(ep), "--layers", str(layers)]
            points.append(by_point.get((name, layers)) or _run_point(args))
            results.write_text(json.dumps(points, indent=2))
    return points


def depth_markdown(points: list[dict]) -> str:
    """Each phase by depth, and what each layer past the previous point added against the
    mean layer of the 2-layer point (the issue's bound: a tenth)."""
    import platform

    lines = [
        f"Cold start by depth on fake ranks (one process, meta device), {platform.machine()}, "
        f"{os.cpu_count()} cores; `python -m benchmarks.scaling --depth`. Seconds per phase; "
        '"per layer": what each layer past the previous row added, as a share of the '
        "2-layer row's mean layer (phase / 2).",
        "",
        "| config | layers | fake ranks | ep | trace | solve | apply | t+s+a | compile "
        "| per layer: trace | solve | apply | compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    previous: dict | None = None
    for p in points:
        if previous is None or previous["config"] != p["config"]:
            first, previous = p, None
        shares = [""] * len(PHASES)
        if previous is not None:
            added = p["layers"] - previous["layers"]
            shares = [
                f"{(p[k] - previous[k]) / added / (first[k] / first['layers']):.2f}"
                if p.get(k) and first.get(k) and previous.get(k)
                else ""
                for k in PHASES
            ]
        compile_s = f"{p['compile']:.1f}" if p.get("compile") else ""
        lines.append(
            f"| {p['config']} | {p['layers']} | {p['mesh']} | {p['ep']} | {p['trace']:.1f} "
            f"| {p['solve']:.1f} | {p['apply']:.1f} | {p['trace'] + p['solve'] + p['apply']:.1f} "
            f"| {compile_s} | {' | '.join(shares)} |"
        )
        previous = p
    return "\n".join(lines) + "\n"


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
        help="with --named: writes OUTPUT.json and OUTPUT.md (points already there are kept); "
        "--depth: OUTPUT-depth.{json,md}; under torchrun: appends to OUTPUT-ranks.json",
    )  # fmt: skip
    parser.add_argument(
        "--depth", action="store_true",
        help="the large configs at 2, 8, 16 and all their layers, each in a process, as a table",
    )  # fmt: skip
    parser.add_argument(
        "--fresh", action="store_true", help="with --named or --depth: measure every point"
    )
    args = parser.parse_args()
    if args.depth:
        output = args.output.with_name(args.output.name + "-depth")
        points = depth_table(output.with_suffix(".json"), fresh=args.fresh)
        table = depth_markdown(points)
        output.with_suffix(".md").write_text(table)
        print(table)
        return
    if args.named:
        results = args.output.with_suffix(".json")
        done = [] if args.fresh or not results.exists() else json.loads(results.read_text())
        points = named_table(done)
        table = named_markdown(points)
        results.write_text(json.dumps(points, indent=2))
        args.output.with_suffix(".md").write_text(table)
        print(table)
        return
    if args.mesh is None and "RANK" not in os.environ:
        parser.error("--mesh is required (or --named, --depth, or torchrun)")
    point = plan_point(args.config, mesh=args.mesh, layers=args.layers, ep=args.ep)
    if args.mesh is None and os.environ["RANK"] != "0":
        return
    print(json.dumps(point))
    if args.mesh is None:
        # Real ranks: appended to OUTPUT-ranks.json, the file of such points.
        results = args.output.with_name(args.output.name + "-ranks").with_suffix(".json")
        done = json.loads(results.read_text()) if results.exists() else []
        results.write_text(json.dumps([*done, point], indent=2))


if __name__ == "__main__":
    main()
