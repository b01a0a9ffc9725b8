"""Plan an AutoParallel config on a fake process group of any size, in a fresh process, and
print the plan report as JSON on the last line (for tests that need another world size than
their own process's).

    python -m tests.support.plan_probe --world 8 --layers 2 --parallelism.tensor_parallel_degree 2
"""

from __future__ import annotations

import argparse
import tempfile

import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torchtitan.config import ConfigManager

from torchtitan_ext.parallelize import plan_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--layers", type=int, default=0, help="keep the first N layers")
    parser.add_argument("--config", default="llama3_debugmodel_autoparallel")
    args, overrides = parser.parse_known_args()
    config = ConfigManager().parse_args(
        ["--module", "config_registry", "--config", args.config, *overrides]
    )
    if args.layers:
        config.model_spec.model.layers = config.model_spec.model.layers[: args.layers]
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.world)
    _, _, component = plan_model(config, world_size=args.world, dump_folder=tempfile.mkdtemp())
    print(component.report.to_json().replace("\n", " "))


if __name__ == "__main__":
    main()
