"""Plan an AutoParallel config on a fake process group of any size, in a fresh process, and
print the plan report as JSON on the last line (for tests that need another world size than
their own process's). Under torchrun (no ``--world``), on its gloo ranks, each planning on
the meta device: each rank prints ``{"rank", "solves", "ilps", "report"}`` (how many times
it ran AutoParallel's solve, and built the solver's ILP); ``--fail-solve`` makes rank 0's
solve raise, ``--rank1-layers N`` gives rank 1 another model (N layers).

    python -m tests.support.plan_probe --world 8 --layers 2 --parallelism.tensor_parallel_degree 2
    torchrun --nproc-per-node 2 --tee 3 -m tests.support.plan_probe --layers 1
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torchtitan.config import ConfigManager

from torchtitan_ext.parallelize import plan_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, help="fake ranks; unset: torchrun's gloo ranks")
    parser.add_argument("--layers", type=int, default=0, help="keep the first N layers")
    parser.add_argument("--config", default="llama3_debugmodel_autoparallel")
    parser.add_argument("--fail-solve", action="store_true", help="rank 0's solve raises")
    parser.add_argument("--rank1-layers", type=int, default=0, help="rank 1 keeps N layers")
    args, overrides = parser.parse_known_args()
    config = ConfigManager().parse_args(
        ["--module", "config_registry", "--config", args.config, *overrides]
    )
    if args.rank1_layers and os.environ.get("RANK") == "1":
        args.layers = args.rank1_layers
    if args.layers:
        config.model_spec.model.layers = config.model_spec.model.layers[: args.layers]
    if args.world is not None:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.world)
        _, _, component = plan_model(config, world_size=args.world, dump_folder=tempfile.mkdtemp())
        print(component.report.to_json().replace("\n", " "))
        return

    from autoparallel.api import AutoParallel
    from autoparallel.optimize_sharding import ShardingOptimizer

    dist.init_process_group("gloo")
    counts = {"solves": 0, "ilps": 0}
    solve, build_ilp = AutoParallel.optimize_placement, ShardingOptimizer._build_decision_vars

    def counted_solve(self, *a, **k):
        counts["solves"] += 1
        if args.fail_solve and dist.get_rank() == 0:
            raise RuntimeError("probe: rank 0's solve failed")
        return solve(self, *a, **k)

    def counted_ilp(self, *a, **k):
        counts["ilps"] += 1
        return build_ilp(self, *a, **k)

    AutoParallel.optimize_placement = counted_solve
    ShardingOptimizer._build_decision_vars = counted_ilp
    world = dist.get_world_size()
    _, _, component = plan_model(config, world_size=world, dump_folder=tempfile.mkdtemp())
    report = json.loads(component.report.to_json())
    print(json.dumps({"rank": dist.get_rank(), **counts, "report": report}))


if __name__ == "__main__":
    main()
