"""The named integration runs.

CPU tier: runs inside ``.ci/run`` (through tests/test_integration.py) on 2 cores, so few and
short; each combines several requirements. GPU tier: for 4-8 GPU runners
(.github/workflows/gpu_integration.yml); defined here, runnable only where GPUs are present.
"""

from __future__ import annotations

from tests.support.integration import OverrideDefinitions
from tests.support.integration.checks import (
    CheckpointFolders,
    EveryRankLogged,
    FiniteLosses,
    LogContains,
    LossFalls,
    ResumeMatches,
    StepsRan,
)

DEBUG = "llama3_debugmodel_autoparallel"
SHARED_ROPE = "llama3_debugmodel_shared_rope_autoparallel"

# The component's log lines (torchtitan_ext/parallelize/): aliases captured, the
# parallel model's names checked against the original's, and the plan report.
NAMES_MATCH = r"AutoParallel: \d+ parameter, \d+ buffer and \d+ state_dict names match the original"
TIED_CAPTURED = r"parameter tok_embeddings\.weight = lm_head\.weight"
TIED_ACROSS_STAGES = (
    r"Tied tok_embeddings\.weight = lm_head\.weight across pipeline stages: values synced"
)
ROPE_CAPTURED = r"buffer layers\.0\.attention\.rope\.cache = layers\.1\.attention\.rope\.cache"
# tied and shared RoPE: the shared-RoPE config derives from the tied one.
SHARED_ROPE_CAPTURED = (TIED_CAPTURED, ROPE_CAPTURED)

QWEN3_MOE = "qwen3_moe_debug_autoparallel"
DEEPSEEK_V3 = "deepseek_v3_debugmodel_autoparallel"
EP_PLANNED = r"AutoParallel: expert parallelism on 2 MoE layer\(s\)"


TRACED = r"AutoParallel: trace [\d.]+s, solve [\d.]+s, apply [\d.]+s\. Plan:"
# A rerun in the same dump folder rebuilds an eager plan from the graph cache.
FROM_GRAPH_CACHE = (
    r"AutoParallel: graph cache hit \(\S*graph_cache/\w+/rank0\.pkl\): no trace, solve or apply",
    r"AutoParallel: from the graph cache\. Plan:",
)


def plan_lines(mesh: str, params: str, flop_share: str) -> tuple[str, ...]:
    """The plan report's lines for a mesh, e.g. plan_lines("{'dp_shard': 2}", ...), traced
    or from the graph cache."""
    return (
        r"AutoParallel: (trace [\d.]+s, solve [\d.]+s, apply [\d.]+s|from the graph cache)\. Plan:",
        "mesh " + mesh.replace("{", r"\{").replace("}", r"\}"),
        r"collectives per step",
        r"parameters: \d+ " + params,
        rf"forward matmul FLOPs on this rank: {flop_share} of the model",
    )


# Deterministic checkpointed training for the kill-and-resume runs: 4 steps, full
# checkpoints (the last one too) at steps 2 and 4, from seed 42; losses at full precision
# in TensorBoard, for the exact comparison of the resumed steps.
_CHECKPOINTED = [
    "--training.steps", "4",
    "--checkpoint.enable",
    "--checkpoint.interval", "2",
    "--checkpoint.no-last-save-model-only",
    "--debug.seed", "42",
    "--debug.deterministic",
    "--metrics.enable_tensorboard", "--metrics.save_tb_folder", "tb",
]  # fmt: skip

# tests/support/faults/sitecustomize.py: SIGKILL while DCP writes step-4.
KILL_DURING_STEP4_SAVE = {
    "PYTHONPATH": "{repo}/tests/support/faults",
    "TORCHTITAN_EXT_TEST_KILL_SAVE": "step-4",
}


def _kill_and_resume(*extra: str) -> dict:
    """Two identical commands in one dump folder: the first is killed while it writes its
    step-4 checkpoint (after training step 4); the second resumes on its own, from the last
    complete checkpoint (step 2: torchtitan ignores step folders without .metadata), and
    must repeat the first one's steps 3 and 4 exactly (full-precision losses, bit for bit)."""
    args = [*_CHECKPOINTED, *extra]
    return {
        "override_args": [args, args],
        "command_env": [KILL_DURING_STEP4_SAVE, {}],
        "must_fail": (0,),
    }


KILL_AND_RESUME_CHECKS = (
    LogContains((r"\[kill-shim\] SIGKILL during the DCP save of \S*checkpoint/step-4",), 0),
    StepsRan((1, 2, 3, 4), command=0),
    CheckpointFolders(0, complete=(2,), incomplete=(4,)),
    LogContains((r"Loading the checkpoint from \S*checkpoint/step-2\.",), 1),
    LogContains((r"Training starts at step 3\b",), 1),
    StepsRan((3, 4), command=1),
    ResumeMatches(resumed=1, reference=0, min_steps=2),
    CheckpointFolders(1, complete=(2, 4)),
)


CPU_RUNS = [
    OverrideDefinitions(
        test_name="ap_shared_rope_1rank_kill_resume",
        test_descr=(
            "1 rank, shared-RoPE AutoParallel config driven with MODULE= (torchtitan's name): "
            "aliases captured and restored; killed while saving its step-4 checkpoint, the "
            "rerun rebuilds the model from the graph cache, resumes from step 2 and repeats "
            "steps 3-4 exactly"
        ),
        config=SHARED_ROPE,
        tier="cpu",
        ngpu=1,
        model_variable="MODULE",
        **_kill_and_resume("--training.local_batch_size", "4"),
        checks=(
            FiniteLosses(),
            LossFalls(command=0),
            LogContains(SHARED_ROPE_CAPTURED, command=0),
            LogContains((NAMES_MATCH, *plan_lines("{'dp_shard': 1}", r"dp_shard=\w+", "1.000"))),
            LogContains((TRACED,), command=0),
            LogContains(FROM_GRAPH_CACHE, command=1),  # and repeats steps 3-4 exactly
            *KILL_AND_RESUME_CHECKS,
        ),
    ),
    OverrideDefinitions(
        test_name="ap_tied_pp2_kill_resume",
        test_descr=(
            "2 ranks, the tied debug config with --parallelism.pipeline_parallel_degree 2 "
            "(1F1B): each stage planned by AutoParallel, the embeddings tied across the "
            "stages; killed while saving its step-4 checkpoint, the rerun resumes from step 2 "
            "and repeats steps 3-4 exactly"
        ),
        config=DEBUG,
        tier="cpu",
        ngpu=2,
        **_kill_and_resume(
            "--parallelism.pipeline_parallel_degree",
            "2",
            "--parallelism.data_parallel_shard_degree",
            "1",
            "--parallelism.pipeline_parallel_schedule",
            "1F1B",
        ),  # fmt: skip
        checks=(
            FiniteLosses(),
            EveryRankLogged(ranks=2),
            LossFalls(margin=1.0, rank=1),  # the last stage's rank prints the loss
            LogContains(
                (TIED_ACROSS_STAGES, *plan_lines("{'dp_shard': 1}", r"dp_shard=R", "1.000"))
            ),
            *KILL_AND_RESUME_CHECKS,
        ),
    ),
    OverrideDefinitions(
        test_name="ap_torchtitan_entry_point_2ranks",
        test_descr=(
            "2 ranks through torchtitan's own entry point "
            "(torchrun -m torchtitan.train --module config_registry): the FSDP-like plan, "
            "every rank logs every step, loss falls"
        ),
        config=DEBUG,
        tier="cpu",
        ngpu=2,
        launcher="torchrun",
        override_args=[["--training.steps", "4"]],
        checks=(
            FiniteLosses(),
            EveryRankLogged(ranks=2),
            LossFalls(margin=1.0),
            LogContains((TIED_CAPTURED, NAMES_MATCH)),
            LogContains(plan_lines("{'dp_shard': 2}", r"dp_shard=S\(0\)", "0.500")),
        ),
    ),
    OverrideDefinitions(
        test_name="ap_qwen3_moe_ep2_kill_resume",
        test_descr=(
            "2 ranks, Qwen3 MoE (tied) with --parallelism.expert_parallel_degree 2: whole "
            "experts per rank, tokens sent with all_to_all; killed while saving its step-4 "
            "checkpoint, the rerun resumes from step 2 and repeats steps 3-4 exactly"
        ),
        config=QWEN3_MOE,
        tier="cpu",
        ngpu=2,
        model="qwen3",
        **_kill_and_resume(
            "--parallelism.expert_parallel_degree", "2", "--training.seq_len", "128"
        ),
        checks=(
            FiniteLosses(),
            EveryRankLogged(ranks=2, command=1),
            LossFalls(margin=0.2, command=0),
            LogContains((TIED_CAPTURED, NAMES_MATCH, EP_PLANNED), command=0),
            LogContains(
                (
                    "mesh " + r"\{'ep': 2\}",
                    "experts per rank: 32 of 64 per layer",
                    # Dense layers data-parallel: half the batch in every sized matmul.
                    "forward matmul FLOPs on this rank: 0.500 of the model; "
                    "rows per matmul: 0.500-0.500",
                ),
                0,
            ),
            *KILL_AND_RESUME_CHECKS,
        ),
    ),
    OverrideDefinitions(
        test_name="ap_deepseek_v3_1rank",
        test_descr=(
            "1 rank, DeepSeek-V3 debug model (MLA attention, a dense and an MoE layer, shared "
            "experts) through AutoParallel without expert parallelism: loss falls"
        ),
        config=DEEPSEEK_V3,
        tier="cpu",
        ngpu=1,
        model="deepseek_v3",
        override_args=[["--training.steps", "4", "--training.seq_len", "128"]],
        checks=(
            FiniteLosses(),
            LossFalls(margin=0.2),
            LogContains((NAMES_MATCH, *plan_lines("{'dp_shard': 1}", r"dp_shard=\w+", "1.000"))),
        ),
    ),
    OverrideDefinitions(
        test_name="ap_fake_backend_8ranks",
        test_descr=(
            "NGPU=8 COMM_MODE=fake_backend: one process plans and runs a step of an 8-rank "
            "job of the debug AutoParallel config, no communication"
        ),
        config=DEBUG,
        tier="cpu",
        ngpu=8,
        comm_mode="fake_backend",
        override_args=[["--training.steps", "1"]],
        checks=(
            LogContains((r"Running with comm_mode=fake_backend \(NGPU=8, one process\)",)),
            LogContains((TIED_CAPTURED, NAMES_MATCH)),
            LogContains(plan_lines("{'dp_shard': 8}", r"dp_shard=S\(0\)", "0.125")),
            LogContains((r"global batch size 64\b",)),
            StepsRan((1,)),
        ),
    ),
]


def _gpu(name: str, descr: str, ngpu: int, args: list[str], *checks, config=DEBUG, **kw):
    """A GPU-tier run: every rank logs every step; losses finite."""
    return OverrideDefinitions(
        test_name=name,
        test_descr=descr,
        config=config,
        tier="gpu",
        ngpu=ngpu,
        override_args=[args],
        checks=(FiniteLosses(), EveryRankLogged(ranks=ngpu), LogContains((NAMES_MATCH,)), *checks),
        timeout=kw.pop("timeout", 1200),
        **kw,
    )


_STEPS = ["--training.steps", "10"]
# Large models: few steps, 2048-token sequences (activations fit 24 GiB GPUs without AC).
_LARGE = ["--training.steps", "5", "--training.seq_len", "2048", "--training.local_batch_size", "1"]

GPU_RUNS = [
    _gpu(
        "gpu_dp_shard4",
        "4 GPUs, dp_shard 4: the FSDP-like plan",
        4,
        [*_STEPS, "--parallelism.data_parallel_shard_degree", "4"],
        LossFalls(margin=1.0),
        LogContains(plan_lines("{'dp_shard': 4}", r"dp_shard=S\(0\)", "0.250")),
    ),
    _gpu(
        "gpu_dp_shard4_tp2",
        "8 GPUs, dp_shard 4 x tp 2",
        8,
        [*_STEPS, *"--parallelism.data_parallel_shard_degree 4".split()]
        + "--parallelism.tensor_parallel_degree 2".split(),
        LossFalls(margin=1.0),
        LogContains(("mesh " + r"\{'dp_shard': 4, 'tp': 2\}",)),
    ),
    _gpu(
        "gpu_dp_replicate2_dp_shard2",
        "4 GPUs, dp_replicate 2 x dp_shard 2 (HSDP-like)",
        4,
        [*_STEPS, *"--parallelism.data_parallel_replicate_degree 2".split()]
        + "--parallelism.data_parallel_shard_degree 2".split(),
        LossFalls(margin=1.0),
        LogContains(("mesh " + r"\{'dp_replicate': 2, 'dp_shard': 2\}",)),
    ),
    _gpu(
        "gpu_shared_rope_dp_shard4",
        "4 GPUs, shared-RoPE config, dp_shard 4",
        4,
        [*_STEPS, "--parallelism.data_parallel_shard_degree", "4"],
        LossFalls(margin=1.0),
        LogContains(SHARED_ROPE_CAPTURED),
        config=SHARED_ROPE,
    ),
    _gpu(
        "gpu_compile_dp_shard4",
        "4 GPUs, dp_shard 4, --compile.enable (AutoParallel's compile backend)",
        4,
        [*_STEPS, "--parallelism.data_parallel_shard_degree", "4", "--compile.enable"],
        LossFalls(margin=1.0),
        LogContains((r"AutoParallel: compiled plan",)),
    ),
    OverrideDefinitions(
        test_name="gpu_kill_resume_dp_shard8",
        test_descr=(
            "8 GPUs, dp_shard 8: every rank killed while saving the step-4 checkpoint; the "
            "rerun resumes from step 2 and repeats steps 3-4 exactly"
        ),
        config=DEBUG,
        tier="gpu",
        ngpu=8,
        **_kill_and_resume("--parallelism.data_parallel_shard_degree", "8"),
        checks=(FiniteLosses(), EveryRankLogged(ranks=8, command=1), *KILL_AND_RESUME_CHECKS),
        timeout=1200,
    ),
    _gpu(
        "gpu_qwen3_moe_ep4_dp_shard2",
        "8 GPUs, Qwen3 MoE debug model, expert parallelism 4 x efsdp 2 (dp_shard 8): 16 experts "
        "per ep rank, stored sharded on efsdp (8 per rank)",
        8,
        [*_STEPS, "--parallelism.data_parallel_shard_degree", "8"]
        + "--parallelism.expert_parallel_degree 4".split(),
        LossFalls(margin=1.0),
        LogContains(("mesh " + r"\{'efsdp': 2, 'ep': 4\}", "experts per rank: 8 of 64 per layer")),
        config=QWEN3_MOE,
        model="qwen3",
    ),
    _gpu(
        "gpu_llama3_1b_pp2_dp_shard4",
        "8 GPUs, Llama 3.2 1B (tied) with pipeline parallelism 2 x dp_shard 4: each stage "
        "planned by AutoParallel, the embeddings tied across the stages, 5 steps",
        8,
        [*_LARGE, "--parallelism.pipeline_parallel_degree", "2"]
        + "--parallelism.data_parallel_shard_degree 4".split(),
        LogContains((TIED_ACROSS_STAGES, "mesh " + r"\{'dp_shard': 4\}")),
        config="llama3_1b_autoparallel",
    ),
    _gpu(
        "gpu_qwen3_moe_pp2_ep4",
        "8 GPUs, Qwen3 MoE debug model (tied) with pipeline parallelism 2 x expert "
        "parallelism 4: 16 experts per rank in each stage",
        8,
        [*_STEPS, "--parallelism.pipeline_parallel_degree", "2"]
        + "--parallelism.expert_parallel_degree 4".split(),
        LossFalls(margin=1.0, rank=7),
        LogContains((TIED_ACROSS_STAGES, "mesh " + r"\{'ep': 4\}", "experts per rank: 16 of 64")),
        config=QWEN3_MOE,
        model="qwen3",
    ),
    _gpu(
        "gpu_llama3_1b",
        "8 GPUs, Llama 3.2 1B (tied) through AutoParallel, 5 steps",
        8,
        [*_LARGE],
        LogContains((TIED_CAPTURED,)),
        LogContains(("mesh " + r"\{'dp_shard': 8\}",)),
        config="llama3_1b_autoparallel",
    ),
    _gpu(
        "gpu_qwen3_0_6b",
        "8 GPUs, Qwen3 0.6B (tied) through AutoParallel, 5 steps",
        8,
        [*_LARGE],
        LogContains((TIED_CAPTURED,)),
        LogContains(("mesh " + r"\{'dp_shard': 8\}",)),
        config="qwen3_0_6b_autoparallel",
        model="qwen3",
    ),
]

RUNS = CPU_RUNS + GPU_RUNS


def by_name(name: str) -> OverrideDefinitions:
    for run in RUNS:
        if run.test_name == name:
            return run
    raise KeyError(f"no integration run named {name!r}; runs: {[r.test_name for r in RUNS]}")
