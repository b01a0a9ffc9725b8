"""run_train.sh's launcher: find the config, check the run, then start it, in one process.

``run_train.sh`` exports MODEL, CONFIG, NGPU, LOG_RANK and COMM_MODE and runs
``python -m torchtitan_ext.launch [trainer flags...]``, which

1. finds the module that defines CONFIG: our root config_registry.py first, then
   torchtitan's registry for MODEL (read with ``ast``; an unknown name lists both);
2. parses the config with the flags as every rank will, and checks what would otherwise
   fail only after every rank started, each inside its own traceback: NGPU or LOG_RANK out
   of range, a flag or value tyro rejects, fewer than 1 step, degrees that do not multiply
   to NGPU, a global batch size torchtitan's Trainer asserts on, a dump folder that cannot
   be written, AutoParallel missing, degrees it does not plan, memory bounds out of order,
   a placement file solved for another plan (``parallelize.spec.check_before_launch``), a
   newest checkpoint whose ``.metadata`` DCP cannot read (``dump_folder.check_resume``);
3. takes the dump folder's run lock (``dump_folder.run_lock``): a folder another run is
   using is refused;
4. starts torchrun in this process (the interpreter torchrun would have started anyway), or
   with COMM_MODE the one training process itself, and holds the lock until it exits.

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
import tempfile
from pathlib import Path

from torchtitan_ext.dump_folder import check_resume, run_lock

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
    """What the ranks would fail on, checked once here (ValueError or ImportError). Creates
    the dump folder if missing, as the ranks would, once everything else passed."""
    from torchtitan.distributed import ParallelDims

    from torchtitan_ext.trainer import AutoParallelTrainer

    if config.training.steps < 1:
        # torchtitan would start every rank, build the model and train no step.
        raise ValueError(
            f"--training.steps {config.training.steps}: a run trains at least 1 step; "
            "pass --training.steps 1 or more"
        )
    try:
        parallel_dims = ParallelDims.from_config(config.parallelism, world_size)
    except AssertionError as e:
        raise ValueError(
            f"the parallelism degrees do not fit NGPU={world_size} ({e}): set NGPU to their "
            "product, or set --parallelism.data_parallel_shard_degree -1 to take the rest"
        ) from None
    dp_degree = parallel_dims.dp_replicate * parallel_dims.dp_shard  # torchtitan's "batch" mesh
    check_batch_sizes(config.training, dp_degree=dp_degree)
    if (
        parallel_dims.pp > 1
        and getattr(config.model_spec.model, "enable_weight_tying", False)
        and getattr(config, "parallelize", None) != "autoparallel"
    ):
        raise ValueError(
            f"--parallelism.pipeline_parallel_degree {parallel_dims.pp}: torchtitan's own "
            "parallelization refuses tied embeddings with pipeline parallelism; drop "
            "--parallelize torchtitan (AutoParallel keeps the tie across stages) or use an "
            "untied config"
        )
    if isinstance(config, AutoParallelTrainer.Config) and config.parallelize == "autoparallel":
        from torchtitan_ext.parallelize.spec import check_before_launch

        check_before_launch(config, parallel_dims)
    check_resume(config.checkpoint, dump_folder=config.dump_folder)
    make_dump_folder(config.dump_folder)


def check_batch_sizes(training, *, dp_degree: int) -> None:
    """torchtitan's Trainer asserts on every rank that the global batch size (-1: local
    batch x data-parallel degree) is a positive multiple of local batch x data-parallel
    degree; both dataloaders (torchtitan's and ours) take one local batch per rank."""
    local, global_ = training.local_batch_size, training.global_batch_size
    if local < 1:
        raise ValueError(
            f"--training.local_batch_size {local}: each rank needs at least 1 row; "
            "pass --training.local_batch_size 1 or more"
        )
    rows = local * dp_degree
    if global_ < 0 or (global_ > 0 and global_ % rows == 0):
        return
    fix = f"pass a positive multiple of {rows} (-1 means {rows}, no gradient accumulation)"
    if global_ > 0 and global_ % dp_degree == 0:
        # The largest local batch up to this one that divides each rank's share.
        share = global_ // dp_degree
        fitting = max(n for n in range(1, local + 1) if share % n == 0)
        fix += f", or --training.local_batch_size {fitting}"
    raise ValueError(
        f"--training.global_batch_size {global_} is not a positive multiple of "
        f"--training.local_batch_size {local} x data-parallel degree {dp_degree} = {rows}: "
        f"{fix}"
    )


def make_dump_folder(path: str) -> None:
    """Create the dump folder if missing and prove it writable with a file made and removed
    there (permission bits alone do not stop root)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(
            f"--dump_folder {path} cannot be written ({e.strerror or e}): pass --dump_folder "
            "a folder you can write to"
        ) from None


def ranks_of(ngpu_text: str) -> int:
    """NGPU as a rank count (empty: default_ranks()); ValueError unless at least 1."""
    if not ngpu_text:
        return default_ranks()
    if not re.fullmatch(r"[0-9]+", ngpu_text):
        raise ValueError(f"NGPU must be a number of ranks, got {ngpu_text!r}")
    if int(ngpu_text) < 1:
        raise ValueError(
            f"NGPU={ngpu_text}: a run needs at least 1 rank; set NGPU=1 or more, or unset it "
            f"for this machine's default ({default_ranks()})"
        )
    return int(ngpu_text)


def check_log_rank(log_rank: str, *, ngpu: int) -> None:
    """LOG_RANK as torchrun's --local-ranks-filter takes it, naming only ranks that run."""
    if not all(re.fullmatch(r"[0-9]+", r) and int(r) < ngpu for r in log_rank.split(",")):
        raise ValueError(
            f"LOG_RANK={log_rank!r} must be rank numbers below NGPU={ngpu}, comma-separated: "
            f"e.g. LOG_RANK=0 or LOG_RANK=0,{ngpu - 1}"
        )


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
    comm_mode = os.environ.get("COMM_MODE", "")
    log_rank = os.environ.get("LOG_RANK") or "0"  # run_train.sh's default too
    held = contextlib.ExitStack()  # the dump folder's run lock, once taken
    try:
        ngpu = ranks_of(os.environ.get("NGPU", ""))
        if not comm_mode:  # one process: LOG_RANK is not used
            check_log_rank(log_rank, ngpu=ngpu)
        module = resolve(model, config_name)
        if comm_mode:
            args = [f"--comm.mode={comm_mode}", "--training.steps", "1", *args]
        if "--help" in args or "-h" in args:
            from torchtitan_ext.train import CPUConfigManager

            # Prints every option with its help and exits 0; nothing to launch.
            CPUConfigManager().parse_args(["--module", module, "--config", config_name, *args])
        config = parse_config(module, config_name, args)
        check(config, world_size=ngpu)
        held.enter_context(run_lock(config.dump_folder, warn=_warn))
    except (ValueError, ImportError) as e:
        print(f"run_train.sh: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # Held until this process exits: torchrun runs in it, the ranks as its children.
    with held:
        _start(
            ngpu=ngpu,
            log_rank=log_rank,
            comm_mode=comm_mode,
            module=module,
            config=config_name,
            args=args,
        )
    return 0


def _warn(message: str) -> None:
    print(f"run_train.sh: warning: {message}", file=sys.stderr, flush=True)


def _start(*, ngpu: int, log_rank: str, comm_mode: str, module: str, config: str, args):
    if comm_mode:
        print(f"Running with comm_mode={comm_mode} (NGPU={ngpu}, one process)", flush=True)
        os.environ["LOCAL_RANK"] = "0"
        from torchtitan_ext import train

        sys.argv = [train.__file__, "--module", module, "--config", config, *args]
        train.main()
        return
    from torch.distributed.run import main as torchrun

    os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"
    torchrun(_torchrun_argv(ngpu=ngpu, log_rank=log_rank, module=module, config=config, args=args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
