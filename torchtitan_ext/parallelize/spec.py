"""What one start plans for (PlanSpec), derived from torchtitan's arguments, and the checks
that must hold before any rank starts (check_before_launch, run by run_train.sh).

The plan key (plan_key) names everything a solution depends on; placement files and graph
cache entries hold it, and one made for another key is refused.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor.placement_types import Replicate, Shard
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed.fsdp import get_fsdp_reshard_after_forward_policy
from torchtitan.models.common.moe import RoutedExperts
from torchtitan.tools.logging import logger

from torchtitan_ext import tied_stages
from torchtitan_ext.parallelize.expert_parallel import EP_DATA_AXES
from torchtitan_ext.parallelize.placements import check_placement_file
from torchtitan_ext.ranks import is_rank0

# The AutoParallel commit this project is tested against; pyproject.toml's extra pins it too.
# For the install message only: keys hold what is installed (autoparallel_version).
AUTOPARALLEL_COMMIT = "a54c2529b1cb10b6b27a585b4a6fc2f84bc1d232"
AUTOPARALLEL_INSTALL = (
    "pip install 'autoparallel @ git+https://github.com/meta-pytorch/autoparallel.git@"
    f"{AUTOPARALLEL_COMMIT}' pulp  (or: pip install -e '.[autoparallel]'). "
    "The PyPI package named 'autoparallel' is an unrelated project."
)

# torchtitan mesh axes AutoParallel plans over, in mesh order. The sharded data axis is
# "fsdp" under the partial_dtensor backend and "dp_shard" under the others; torchtitan keeps
# it even at size 1, so a 1-rank run gets a 1-rank mesh.
DATA_AXES = ("dp_replicate", "fsdp", "dp_shard", *EP_DATA_AXES)


def require_autoparallel() -> None:
    """Raise ImportError with the install command when Meta's AutoParallel is missing."""
    try:
        from autoparallel.api import AutoParallel  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"Meta's AutoParallel is not installed ({e}). Install it at the pinned commit: "
            f"{AUTOPARALLEL_INSTALL}"
        ) from e


def source_digest(root: Path, files: list[Path]) -> str:
    """A digest of these files' paths (relative to ``root``) and contents."""
    digest = hashlib.sha256()
    for path in sorted(files):
        data = path.read_bytes()
        digest.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


@functools.cache
def autoparallel_version() -> str:
    """The installed AutoParallel: a digest of its package's Python source (every *.py
    under the package folder). It is installed from git or a tarball without a version
    that names its code, so graph cache entries and placement files (plan_key) hold this."""
    spec = importlib.util.find_spec("autoparallel")
    if spec is None or spec.origin is None:
        raise ImportError("Meta's AutoParallel is not installed (no 'autoparallel' package)")
    root = Path(spec.origin).parent
    return source_digest(root, list(root.rglob("*.py")))


@dataclass(frozen=True, slots=True)
class Stage:
    """A pipeline stage module as torchtitan's pipeline_llm leaves it: the modules of other
    stages are None, its layers keep their names. Each stage is planned on its own."""

    first: bool
    """It embeds the token ids (tok_embeddings); the others take hidden states."""
    last: bool
    """It computes the logits (lm_head); the others return hidden states."""
    layers: tuple[str, ...]
    ties: bool
    """The model ties tok_embeddings.weight to lm_head.weight."""

    @property
    def tied(self) -> str | None:
        """This stage's copy of tied embeddings when it holds one end of the tie, kept
        equal to the other stage's (torchtitan_ext.tied_stages); else None."""
        if not self.ties or self.first == self.last:
            return None
        return tied_stages.FIRST if self.first else tied_stages.LAST

    @property
    def name(self) -> str:
        """e.g. "stage-layers.0-2" (its report folder; unique within a model)."""
        return (
            f"stage-layers.{self.layers[0]}-{self.layers[-1]}"
            if self.layers
            else ("stage-embeddings" if self.first else "stage-output")
        )

    @classmethod
    def of(cls, model) -> Stage:
        return cls(
            first=getattr(model, "tok_embeddings", None) is not None,
            last=getattr(model, "lm_head", None) is not None,
            layers=tuple(getattr(model, "layers", {}).keys()),
            ties=getattr(model, "enable_weight_tying", False),
        )


@dataclass(frozen=True, slots=True)
class PlanSpec:
    """What one parallelization plans for; built from torchtitan's arguments (build)."""

    axes: list[str]
    mesh: object  # DeviceMesh with these axes
    batch: int
    """Global batch (rows) of one microbatch."""
    input_fn: Callable
    mp_policy: object
    reshard_after_forward: bool
    input_placement: tuple
    logits_placement: tuple
    memory_bounds: tuple[float, float]
    placement_path: str
    key: dict
    """plan_key(): what a placement file must have been solved for."""
    dump: str
    """<dump_folder>/autoparallel: plan.json, startup.json, placement dumps."""
    compile: bool
    """--compile.enable with the model among its components: Inductor compiles the graphs."""
    ac: bool
    """Activation checkpointing asked for (AutoParallel's AC pass, compiled only)."""
    stage: Stage | None
    """Pipeline parallelism: the stage this module is; None without PP."""
    writes: bool
    """Whether this rank writes the start's files (plan, start-up report, placements): rank
    0; under PP the first rank of each stage's data-parallel mesh, one folder per stage."""

    @property
    def expert_parallel(self) -> bool:
        return "ep" in self.axes

    @classmethod
    def build(
        cls,
        model,
        *,
        config,
        parallel_dims,
        training,
        parallelism,
        compile_config,
        ac_config,
        dump_folder: str,
    ) -> PlanSpec:
        """The mesh, global input shapes, precision, placement constraints of inputs and
        logits, and the key a placement file must match. ``config``: the component's."""
        from autoparallel.input_validation import ForwardInputs
        from torch.distributed.fsdp import MixedPrecisionPolicy

        check_parallel_dims(parallel_dims)
        axes = mesh_axes(parallel_dims, spmd_backend=parallelism.spmd_backend)
        mesh = parallel_dims.get_mesh(list(axes) if len(axes) > 1 else next(iter(axes)))
        assert tuple(mesh.shape) == tuple(axes.values()), (mesh.shape, axes)
        batch = global_batch(training, parallel_dims, parallelism)
        stage = Stage.of(model) if parallel_dims.pp > 1 else None
        vocab_size = model.config.vocab_size
        mesh_device = torch.device(mesh.device_type)

        def input_fn():
            # Global shapes of one microbatch, called as the Trainer calls the model:
            # model(tokens, positions=positions), positions int64 like the dataloader's. A
            # pipeline stage but the first takes the previous stage's hidden states, which
            # require grad: PipelineStage sends their gradient back.
            if stage is None or stage.first:
                first = torch.randint(0, vocab_size, (batch, training.seq_len), device=mesh_device)
            else:
                shape = (batch, training.seq_len, model.config.dim)
                dtype = TORCH_DTYPE_MAP[training.dtype]
                first = torch.randn(shape, device=mesh_device, dtype=dtype, requires_grad=True)
            positions = torch.arange(training.seq_len, device=mesh_device).repeat(batch, 1)
            return ForwardInputs(args=(first,), kwargs={"positions": positions})

        param_dtype = TORCH_DTYPE_MAP[training.mixed_precision_param]
        reduce_dtype = TORCH_DTYPE_MAP[training.mixed_precision_reduce]
        model_dtype = TORCH_DTYPE_MAP[training.dtype]
        mp_policy = None
        if param_dtype != model_dtype or reduce_dtype != model_dtype:
            mp_policy = MixedPrecisionPolicy(
                param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False
            )
        # Inputs: the batch on the data axes, replicated on tp. Logits: the batch on the
        # data axes and, on tp, what torchtitan's loss takes: vocab-sharded under the
        # spmd_types backend (its loss-parallel cross-entropy when tp > 1), the full
        # vocabulary under the DTensor backends.
        vocab_parallel = parallelism.spmd_backend == "spmd_types"
        compile_model = compile_config.enable and "model" in compile_config.components
        if ac_config is not None and not compile_model:
            logger.warning(
                f"AutoParallel: {type(ac_config).__qualname__} activation checkpointing runs "
                "only compiled (AutoParallel's AC pass); eager keeps every activation"
            )
        return cls(
            axes=list(axes),
            mesh=mesh,
            batch=batch,
            input_fn=input_fn,
            mp_policy=mp_policy,
            reshard_after_forward=get_fsdp_reshard_after_forward_policy(
                parallelism.fsdp_reshard_after_forward, parallel_dims.pp_enabled
            ),
            input_placement=tuple(Shard(0) if a in DATA_AXES else Replicate() for a in axes),
            # A stage but the last returns hidden states: the batch on the data axes, whole
            # on tp.
            logits_placement=tuple(
                Shard(0)
                if a in DATA_AXES
                else (Shard(2) if vocab_parallel and (stage is None or stage.last) else Replicate())
                for a in axes
            ),
            memory_bounds=memory_bounds(config, parallel_dims),
            placement_path=placement_path(config, dump_folder, stage),
            key=plan_key(
                model_config=model.config,
                parallel_dims=parallel_dims,
                training=training,
                parallelism=parallelism,
                config=config,
                stage=stage,
            ),
            dump=os.path.join(dump_folder, "autoparallel", *([stage.name] if stage else [])),
            compile=compile_model,
            ac=ac_config is not None,
            stage=stage,
            writes=is_rank0() if stage is None else all(r == 0 for r in mesh.get_coordinate()),
        )


def mesh_axes(parallel_dims, *, spmd_backend: str) -> dict[str, int]:
    """The mesh AutoParallel plans over: torchtitan's data and tp axes of size > 1, in mesh
    order, or the sharded data axis alone (size 1 on one rank). The sharded data axis is
    "fsdp" under the partial_dtensor backend and "dp_shard" under the others. With expert
    parallelism, torchtitan's sparse mesh: dp_replicate and efsdp (when > 1) and ep, whose
    product is the data-parallel world (ep > 1 runs with tp 1)."""
    if parallel_dims.ep > 1:
        efsdp = parallel_dims.dp_shard // parallel_dims.ep
        sizes = {"dp_replicate": parallel_dims.dp_replicate, "efsdp": efsdp}
        return {**{axis: size for axis, size in sizes.items() if size > 1}, "ep": parallel_dims.ep}
    shard_axis = "fsdp" if spmd_backend == "partial_dtensor" else "dp_shard"
    sizes = {
        "dp_replicate": parallel_dims.dp_replicate,
        shard_axis: parallel_dims.dp_shard,
        "tp": parallel_dims.tp,
    }
    return {axis: size for axis, size in sizes.items() if size > 1} or {shard_axis: 1}


def check_parallel_dims(parallel_dims) -> None:
    """ValueError for the degrees AutoParallel does not plan here."""
    unplanned = {"context_parallel_degree": parallel_dims.cp}
    unplanned = {name: degree for name, degree in unplanned.items() if degree > 1}
    if unplanned:
        given = ", ".join(f"--parallelism.{name} {degree}" for name, degree in unplanned.items())
        raise ValueError(
            f"AliasAwareAutoParallel plans data, tensor, expert and pipeline parallelism, not "
            f"{given}: set them to 1, or use torchtitan's parallelization "
            "(--parallelize torchtitan)"
        )
    if parallel_dims.ep > 1 and parallel_dims.tp > 1:
        raise ValueError(
            f"AliasAwareAutoParallel plans --parallelism.expert_parallel_degree "
            f"{parallel_dims.ep} with data parallelism only, not with "
            f"--parallelism.tensor_parallel_degree {parallel_dims.tp}: set one of them to 1"
        )


def memory_bounds(config, parallel_dims) -> tuple[float, float]:
    """The parameter memory each rank may hold, as fractions of the model: the component
    config's bounds, defaulting to sharded on dp_shard x tp and replicated on a
    replicate-only mesh."""
    replicate_only = parallel_dims.dp_shard == 1 and parallel_dims.tp == 1
    default_low, default_high = (
        (1.0, 1.0) if replicate_only else (0.0, 1.0 / (parallel_dims.dp_shard * parallel_dims.tp))
    )
    low = default_low if config.param_memory_low is None else config.param_memory_low
    high = default_high if config.param_memory_high is None else config.param_memory_high
    if not 0.0 <= low <= high <= 1.0:
        # The pair as used; an unset bound is this mesh's default.
        low_is = "" if config.param_memory_low is not None else " (unset)"
        high_is = "" if config.param_memory_high is not None else " (unset)"
        raise ValueError(
            f"--autoparallel.param_memory_low/high must satisfy 0 <= low <= high <= 1, got "
            f"low {low:g}{low_is}, high {high:g}{high_is}: pass bounds in that order, or "
            f"leave them unset (this mesh: low {default_low:g}, high {default_high:g})"
        )
    return low, high


def placement_path(config, dump_folder: str, stage: Stage | None = None) -> str:
    """--autoparallel.placement_file under dump_folder; a pipeline stage's has the stage's
    name before the extension (placements.stage-layers.0-2.json)."""
    path = config.placement_file
    if path and not os.path.isabs(path):
        path = os.path.join(dump_folder, path)
    if path and stage is not None:
        root, ext = os.path.splitext(path)
        path = f"{root}.{stage.name}{ext}"
    return path


def global_batch(training, parallel_dims, parallelism) -> int:
    """Rows of one microbatch over all data-parallel ranks. Under PP a stage runs one
    pipeline microbatch at a time (pipeline_parallel_microbatch_size rows a rank)."""
    rows = training.local_batch_size
    if parallel_dims.pp > 1:
        rows = parallelism.pipeline_parallel_microbatch_size
    return rows * parallel_dims.dp_replicate * parallel_dims.dp_shard


def plan_key(*, model_config, parallel_dims, training, parallelism, config, stage=None) -> dict:
    """What a solution is valid for: the model (its config, after update_from_config), the
    mesh, the global input shapes, the dtypes, the constraints, and the engine versions
    (AutoParallel's: a digest of its installed source). Written into placement files; a
    file whose key differs is refused."""
    # The config's repr names init functions by address ("<function normal_ at 0x7f..>").
    model = re.sub(r" at 0x[0-9a-f]+", "", repr(model_config))
    return {
        "model": f"{type(model_config).__qualname__} "
        f"{hashlib.sha256(model.encode()).hexdigest()[:16]}",
        "mesh": mesh_axes(parallel_dims, spmd_backend=parallelism.spmd_backend),
        "inputs": [global_batch(training, parallel_dims, parallelism), training.seq_len],
        "dtypes": {
            "param": training.mixed_precision_param,
            "reduce": training.mixed_precision_reduce,
            "model": training.dtype,
        },
        "reshard_after_forward": parallelism.fsdp_reshard_after_forward,
        "param_memory": list(memory_bounds(config, parallel_dims)),
        "parallel_matmuls": config.parallel_matmuls,
        "torch": torch.__version__,
        "autoparallel": autoparallel_version(),
        # Each pipeline stage is a plan of its own (graph cache entries).
        **({"pp": parallel_dims.pp, "stage": stage.name} if stage is not None else {}),
    }


def plan_key_of(config, parallel_dims, stage: Stage | None = None) -> dict:
    """plan_key() of an AutoParallelTrainer.Config, as the component computes it on the
    ranks. Updates the model config from the trainer config, as the Trainer does."""
    from torchtitan_ext import patches

    with patches.tied_embeddings_with_pipeline():
        config.model_spec.model.update_from_config(config=config)
    return plan_key(
        model_config=config.model_spec.model,
        parallel_dims=parallel_dims,
        training=config.training,
        parallelism=config.parallelism,
        config=config.autoparallel,
        stage=stage,
    )


def check_before_launch(config, parallel_dims) -> None:
    """What would otherwise fail only after every rank started, checked on the parsed
    config and its ParallelDims (run_train.sh runs this before torchrun): the degrees are
    ones AutoParallel plans, the engine is installed, the memory bounds are in order, and a
    placement file was solved for this very plan and places this model's parameters.
    Raises ValueError or ImportError naming the problem and the fix."""
    check_parallel_dims(parallel_dims)
    if parallel_dims.ep > 1 and not list(config.model_spec.model.traverse(RoutedExperts.Config)):
        raise ValueError(
            f"--parallelism.expert_parallel_degree {parallel_dims.ep}: the model of this "
            "config has no MoE layer; use an MoE config (qwen3_moe_debug_autoparallel, "
            "deepseek_v3_debugmodel_autoparallel, ...) or expert_parallel_degree 1"
        )
    memory_bounds(config.autoparallel, parallel_dims)  # raises if out of order
    stages = {None: [""]}  # stage -> the FQN prefixes of its modules ("": the whole model)
    if parallel_dims.pp > 1:
        stages = pipeline_stages(config, parallel_dims)
    require_autoparallel()
    files = {
        stage: path
        for stage in stages
        if (path := placement_path(config.autoparallel, config.dump_folder, stage))
        and os.path.exists(path)
    }
    if not files:
        return
    with torch.device("meta"):
        ranks = parameter_ranks(config.model_spec.model.build())
    for stage, path in files.items():
        parameters = {
            fqn: rank
            for fqn, rank in ranks.items()
            if any(not m or fqn == m or fqn.startswith(f"{m}.") for m in stages[stage])
        }
        check_placement_file(path, plan_key_of(config, parallel_dims, stage), parameters=parameters)


def parameter_ranks(model) -> dict[str, int]:
    """Every parameter FQN of ``model`` (alias names too) -> its number of dims."""
    return {fqn: p.dim() for fqn, p in model.named_parameters(remove_duplicate=False)}


# Schedules that split each backward into an input-gradient and a weight-gradient pass.
# AutoParallel's stage backward is one compiled autograd node: it cannot be split.
_SPLIT_BACKWARD_SCHEDULES = ("ZBVZeroBubble", "DualPipeV", "InterleavedZeroBubble")


def pipeline_stages(config, parallel_dims) -> dict[Stage, list[str]]:
    """The stages torchtitan's pipeline_llm will build (its split, as it computes it on every
    rank), each with its modules' FQNs; ValueError for a pipeline torchtitan cannot build
    (an unknown schedule, stages its split cannot fill) or AutoParallel cannot run."""
    from torch.distributed.pipelining.schedules import get_schedule_class
    from torchtitan.distributed.pipeline_parallel import (
        _generate_llm_fqn_per_model_part,
        _get_pipeline_metadata,
    )

    parallelism = config.parallelism
    pp = f"--parallelism.pipeline_parallel_degree {parallelism.pipeline_parallel_degree}"
    schedule = parallelism.pipeline_parallel_schedule
    try:
        get_schedule_class(schedule)
    except ValueError:
        raise ValueError(
            f"--parallelism.pipeline_parallel_schedule {schedule}: torch has no such schedule; "
            "use GPipe, 1F1B or Interleaved1F1B"
        ) from None
    if schedule in _SPLIT_BACKWARD_SCHEDULES:
        raise ValueError(
            f"{pp}: --parallelism.pipeline_parallel_schedule {schedule} splits each backward "
            "into input and weight gradients, which AutoParallel's compiled stage backward "
            "cannot: use GPipe, 1F1B or Interleaved1F1B"
        )
    split = parallelism.module_fqns_per_model_part
    if split is None:
        try:  # torchtitan's own split, as pipeline_llm runs it on every rank
            split = _generate_llm_fqn_per_model_part(
                *_get_pipeline_metadata(parallel_dims, parallelism, config.model_spec.model)
            )
        except ValueError as e:
            raise ValueError(
                f"{pp} with --parallelism.pipeline_parallel_schedule {schedule}: torchtitan "
                f"cannot split this model into its stages ({e}); lower the degree or use a "
                "schedule with one stage a rank (1F1B)"
            ) from None
    ties = getattr(config.model_spec.model, "enable_weight_tying", False)
    stages = {}
    for modules in split:
        stage = Stage(
            first="tok_embeddings" in modules,
            last="lm_head" in modules,
            layers=tuple(m.split(".", 1)[1] for m in modules if m.startswith("layers.")),
            ties=ties,
        )
        stages[stage] = list(modules)
    return stages
