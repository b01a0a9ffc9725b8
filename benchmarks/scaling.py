"""How AutoParallel's start-up grows with model depth and mesh size.

Each point plans the llama3 debug config (tied embeddings) with a given number of layers on
a fake process group of a given size, in a fresh process: tracing, solving and applying
need no communication, so a fake group stands in for real ranks.

    python -m benchmarks.scaling --layers 4 --mesh 8     # one point, prints JSON
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LAYERS = (2, 4, 8)
MESHES = (2, 4, 8)


def plan_point(layers: int, mesh: int) -> dict:
    import tempfile

    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import config_registry
    from torchtitan_ext.auto_parallel import plan_model

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=mesh)
    config = config_registry.llama3_debugmodel_autoparallel()
    model_config = config.model_spec.model
    model_config.layers = [model_config.layers[i % len(model_config.layers)] for i in range(layers)]
    _, _, component = plan_model(config, world_size=mesh, dump_folder=tempfile.mkdtemp())
    times = component.times
    return {"layers": layers, "mesh": mesh, "trace": times.trace, "solve": times.solve,
            "apply": times.apply}  # fmt: skip


def scaling_table() -> list[dict]:
    """Every (layers, mesh) point, each in its own process."""
    points = []
    for layers in LAYERS:
        for mesh in MESHES:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.scaling", "--layers", str(layers),
                 "--mesh", str(mesh)],
                cwd=REPO_ROOT, capture_output=True, text=True,
            )  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"scaling point {layers} layers, mesh {mesh}:\n{proc.stderr}")
            points.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"scaling: {points[-1]}", flush=True)
    return points


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--mesh", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps(plan_point(args.layers, args.mesh)))


if __name__ == "__main__":
    main()
