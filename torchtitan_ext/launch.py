"""run_train.sh's launcher: find the config, check the run, then start it, in one process.

``run_train.sh`` exports MODEL, CONFIG, NGPU, LOG_RANK and COMM_MODE and runs
``python -m torchtitan_ext.launch [trainer flags...]``, which

1. finds the module that defines CONFIG: our root config_registry.py first, then
   torchtitan's registry for MODEL (read with ``ast``; an unknown name lists both);
2. parses the config with the flags as every rank will, and checks what would otherwise
   fail only after every rank started, each inside its own traceback: a flag or value tyro
   rejects, degrees that do not multiply to NGPU, AutoParallel missing, degrees it does not
   plan, a placement file solved for another plan (``auto_parallel.check_before_launch``);
3. starts torchrun in this process (the interpreter torchrun would have started anyway), or
   with COMM_MODE the one training process itself.

A failed check prints one or two lines, naming the thing and the fix, and exits 1.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import os
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
OUR_REGISTRY = "config_registry"
EXIT_BAD_INPUT = 1


def config_functions(path: Path) -> list[str]:
    """Public top-level function names of a config registry file, in file order."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")
    ]


def torchtitan_registry(model: str) -> Path | None:
    """torchtitan's config_registry.py for a model name (e.g. llama3), if it has one."""
    spec = importlib.util.find_spec("torchtitan")
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(spec.submodule_search_locations[0])
    for folder in ("models", "experiments"):
        path = base / folder / model / "config_registry.py"
        if path.is_file():
            return path
    return None


def resolve(model: str, config: str) -> str:
    """The ``--module`` value that defines CONFIG; ValueError listing choices otherwise."""
    ours = config_functions(REPO_ROOT / f"{OUR_REGISTRY}.py")
    if config in ours:
        return OUR_REGISTRY
    theirs_path = torchtitan_registry(model)
    theirs = config_functions(theirs_path) if theirs_path else []
    if config in theirs:
        return model
    lines = [f"Unknown CONFIG={config!r}.", f"torchtitan_ext configs: {', '.join(ours)}"]
    if theirs_path:
        lines.append(f"torchtitan configs for MODEL={model}: {', '.join(theirs)}")
    else:
        lines.append(f"torchtitan has no model named MODEL={model!r}")
    raise ValueError("\n".join(lines))


def tyro_error(text: str) -> str:
    """tyro's error box, in two lines: what it rejected (and what it suggests), and where
    every option is listed."""
    sections: list[list[str]] = [[]]
    for line in text.splitlines():
        line = line.strip(" \u2502\u256d\u256e\u2570\u256f")
        if re.fullmatch(r"[-\u2500]{10,}.*", line):
            sections.append([])
        elif line and not line.startswith("For full helptext"):
            sections[-1].append(line)
    message = next((" ".join(s) for s in sections[1:] if s), " ".join(sections[0]))
    suggested = [
        line.split()[0]
        for section in sections
        if section and section[0].startswith("Perhaps you meant")
        for line in section[1:]
        if line.startswith("--")
    ]
    if suggested:
        message += f" (did you mean {' or '.join(suggested)}?)"
    return f"{message}\n./run_train.sh --help lists every option."


def parse_config(module: str, config: str, args: list[str]):
    """The config every rank will build from these flags (ValueError with tyro's message
    when it rejects one)."""
    from torchtitan_ext.train import CPUConfigManager

    argv = ["--module", module, "--config", config, *args]
    output = io.StringIO()
    try:
        # torchtitan logs while building configs; only a rejection is worth showing.
        with contextlib.redirect_stderr(output), contextlib.redirect_stdout(output):
            return CPUConfigManager().parse_args(argv)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise ValueError(tyro_error(output.getvalue())) from None


def check(config, *, world_size: int) -> None:
    """What the ranks would fail on, checked once here (ValueError or ImportError)."""
    from torchtitan.distributed import ParallelDims

    from torchtitan_ext.trainer import AutoParallelTrainer

    try:
        parallel_dims = ParallelDims.from_config(config.parallelism, world_size)
    except AssertionError as e:
        raise ValueError(
            f"the parallelism degrees do not fit NGPU={world_size} ({e}): set NGPU to their "
            "product, or set --parallelism.data_parallel_shard_degree -1 to take the rest"
        ) from None
    if isinstance(config, AutoParallelTrainer.Config) and config.parallelize == "autoparallel":
        from torchtitan_ext.auto_parallel import check_before_launch

        check_before_launch(config, parallel_dims)


def default_ranks() -> int:
    """The accelerators present; without any, 2 CPU ranks (1 on a single core)."""
    import torch

    count = torch.accelerator.device_count() if torch.accelerator.is_available() else 0
    return count or (2 if (os.cpu_count() or 1) >= 2 else 1)


def _torchrun_argv(*, ngpu: int, log_rank: str, module: str, config: str, args: list[str]):
    return [
        f"--nproc_per_node={ngpu}",
        "--rdzv_backend", "c10d", "--rdzv_endpoint=localhost:0",
        "--local-ranks-filter", log_rank, "--role", "rank", "--tee", "3",
        "-m", "torchtitan_ext.train", "--module", module, "--config", config, *args,
    ]  # fmt: skip


def main(args: list[str]) -> int:
    model = os.environ.get("MODEL", "llama3")
    config_name = os.environ.get("CONFIG", "llama3_debugmodel_autoparallel")
    ngpu_text = os.environ.get("NGPU", "")
    if not ngpu_text.isdigit() and ngpu_text:
        print(f"run_train.sh: NGPU must be a number of ranks, got {ngpu_text!r}", file=sys.stderr)
        return EXIT_BAD_INPUT
    ngpu = int(ngpu_text) if ngpu_text else default_ranks()
    comm_mode = os.environ.get("COMM_MODE", "")
    try:
        module = resolve(model, config_name)
        if comm_mode:
            args = [f"--comm.mode={comm_mode}", "--training.steps", "1", *args]
        if "--help" in args or "-h" in args:
            from torchtitan_ext.train import CPUConfigManager

            # Prints every option with its help and exits 0; nothing to launch.
            CPUConfigManager().parse_args(["--module", module, "--config", config_name, *args])
        check(parse_config(module, config_name, args), world_size=ngpu)
    except (ValueError, ImportError) as e:
        print(f"run_train.sh: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    if comm_mode:
        print(f"Running with comm_mode={comm_mode} (NGPU={ngpu}, one process)", flush=True)
        os.environ["LOCAL_RANK"] = "0"
        from torchtitan_ext import train

        sys.argv = [train.__file__, "--module", module, "--config", config_name, *args]
        train.main()
        return 0
    from torch.distributed.run import main as torchrun

    os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"
    torchrun(
        _torchrun_argv(
            ngpu=ngpu,
            log_rank=os.environ.get("LOG_RANK", "0"),
            module=module,
            config=config_name,
            args=args,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
