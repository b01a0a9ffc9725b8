"""Pipeline parallelism through AutoParallel: torchtitan's pipeline_llm splits the model and
calls the component once per stage module; each stage is planned on its own (token ids or
hidden states that require grad in, hidden states or logits out). Embeddings tied across
stages are kept one tensor in value (torchtitan_ext.tied_stages). What is not supported yet
is refused by the launcher, before any rank starts."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.support.training import fault_env, run_train, tensorboard_scalars
from tests.test_launch import _assert_refused_in_process
from tests.test_parity import (
    NO_CLIPPING,
    _train,
    eager_run,
    parity_problems,
    seed_checkpoint_of,
)

TIED = "llama3_debugmodel_autoparallel"
SHARED_ROPE = "llama3_debugmodel_shared_rope_autoparallel"
UNTIED = "llama3_debugmodel_untied_autoparallel"
PP2 = (
    "--parallelism.pipeline_parallel_degree",
    "2",
    "--parallelism.data_parallel_shard_degree",
    "1",
)

PP2_ = "--parallelism.pipeline_parallel_degree 2: "
REFUSED = {
    "split-backward schedule": (
        UNTIED, ("--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble"),
        (PP2_, "splits each backward into input and weight gradients"),
    ),
    "unknown schedule": (
        UNTIED, ("--parallelism.pipeline_parallel_schedule", "Foo"),
        ("--parallelism.pipeline_parallel_schedule Foo: torch has no such schedule",),
    ),
    # 6 layers + embeddings + output in stages of 5: 2 stages, 1 a rank; Interleaved needs 2.
    "stages torchtitan cannot split": (
        UNTIED, ("--parallelism.pipeline_parallel_layers_per_stage", "5"),
        (
            "--parallelism.pipeline_parallel_degree 2 with --parallelism.pipeline_parallel_"
            "schedule Interleaved1F1B: torchtitan cannot split this model into its stages "
            "(Multi-stage schedule requires at least 2 stages per rank",
        ),
    ),
    "tied embeddings in torchtitan's own PP": (
        TIED, ("--parallelize", "torchtitan"),
        (PP2_, "torchtitan's own parallelization refuses tied embeddings with pipeline"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_pipeline_parallelism_cannot_do_is_refused(case, tmp_path, monkeypatch, capsys):
    config, args, expected = REFUSED[case]
    _assert_refused_in_process(
        monkeypatch, capsys,
        env={"NGPU": "2", "LOG_RANK": "0", "COMM_MODE": "", "CONFIG": config},
        args=(f"--dump_folder={tmp_path}", *PP2, *args),
        expected=expected,
        lines=1,
    )  # fmt: skip


# run -> (config, schedule, ranks, flags): global batch 8 a step, in microbatches of 1 row.
PIPELINES = {
    "tied_1F1B": (TIED, "1F1B", 2, PP2),
    "tied_Interleaved1F1B": (TIED, "Interleaved1F1B", 2, PP2),
    "shared_rope_GPipe": (SHARED_ROPE, "GPipe", 2, PP2),
    # 4 ranks: each stage sharded over 2 (the tie's copies Shard(0), summed shard by shard).
    "tied_1F1B_dp_shard2": (
        TIED, "1F1B", 4, (*PP2[:2], "--parallelism.data_parallel_shard_degree", "2"),
    ),
}  # fmt: skip


def _eager_and_seed(config: str, tmp_path_factory) -> tuple:
    # The shared-RoPE config has the tied one's parameters: one seed checkpoint.
    seed = seed_checkpoint_of(TIED, tmp_path_factory.mktemp("seed"))
    return eager_run(config, seed, tmp_path_factory.mktemp("eager")), seed


def _pipeline(run: str, seed, dump, *args: str, steps: int = 20, env: dict | None = None):
    config, schedule, ngpu, flags = PIPELINES[run]
    return _train(
        config, seed, dump, *flags, "--parallelism.pipeline_parallel_schedule", schedule,
        "--training.local_batch_size", str(8 * 2 // ngpu), *args, ngpu=ngpu, steps=steps, env=env,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("run", list(PIPELINES))
def test_pipeline_stages_planned_by_autoparallel_match_eager(run, tmp_path_factory):
    """PP 2 on 2 gloo ranks (Interleaved1F1B: 2 stages a rank), 8 microbatches of 1 row, 20
    steps from one seed checkpoint, clipping off, against 1-rank eager: every loss, every
    gradient norm and every step-1 gradient under every name (both names of a tie)."""
    config, schedule, ngpu, _ = PIPELINES[run]
    eager, seed = _eager_and_seed(config, tmp_path_factory)
    dump = tmp_path_factory.mktemp(f"pp_{run}")
    pp = _pipeline(run, seed, dump)
    stages = 4 if schedule == "Interleaved1F1B" else 2
    dp = ngpu // 2
    assert pp.log.count(f"planning on mesh {{'dp_shard': {dp}}}, global batch {dp} x") == (
        stages // 2  # rank 0's stages: the log shows rank 0
    )
    microbatches = 8 // dp
    assert f"schedule {schedule} with {microbatches} microbatches and {stages} stages" in pp.log
    plans = sorted(p.parent.name for p in (dump / "autoparallel").glob("*/plan.json"))
    assert len(plans) == stages, plans  # one plan per stage, each written by its rank
    assert {"tok_embeddings.weight", "lm_head.weight"} <= set(pp.grads)
    assert parity_problems(eager, pp) == {"losses": [], "grad_norms": [], "gradients": []}
    shutil.rmtree(dump / "checkpoint", ignore_errors=True)


# The Trainer's own check (--autoparallel.alias_check, default error): where each fault
# first leaves the two stages' copies of the tie different.
CAUGHT = {"skip_tied_grad_sum": "after step 1", "skip_tied_init_sync": "after init"}
UNCHECKED = ("--autoparallel.alias_check", "off")


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("fault", list(CAUGHT))
def test_the_tie_check_stops_a_run_whose_copies_differ(fault, tmp_path):
    run = run_train(
        TIED, *PP2, "--training.steps", "2", "--training.local_batch_size", "8",
        ngpu=2, dump_folder=tmp_path, env=fault_env(fault),
    )  # fmt: skip
    assert run.returncode != 0
    assert f"[fault-shim] {fault}" in run.log
    assert (
        "AliasError: tied tok_embeddings.weight (first pipeline stage) and lm_head.weight "
        f"(last stage) differ {CAUGHT[fault]}"
    ) in run.log


@pytest.mark.slow
@pytest.mark.engine
def test_tied_pipeline_parity_fails_without_the_gradient_sum(tmp_path_factory):
    """The tie's gradient left unsummed across stages (the tie check off) must fail
    parity: the first stage's tok_embeddings and the last stage's lm_head each get their
    own part of the gradient."""
    fault = "skip_tied_grad_sum"
    eager, seed = _eager_and_seed(TIED, tmp_path_factory)
    faulty = _pipeline(
        "tied_1F1B", seed, tmp_path_factory.mktemp(fault), *UNCHECKED, steps=3,
        env=fault_env(fault),
    )  # fmt: skip
    assert f"[fault-shim] {fault}" in faulty.log
    problems = parity_problems(eager, faulty)
    print(f"{fault}: {problems}")
    assert problems["losses"] and problems["grad_norms"], problems
    assert any(
        p.startswith(("tok_embeddings.weight", "lm_head.weight")) for p in problems["gradients"]
    )


def _checkpointed(config: str, dump: Path, *args: str, ngpu: int, env: dict | None = None):
    """A 10-step run that saves (and loads) DCP checkpoints under ``dump``: its losses and
    gradient norms by step, full precision."""
    run = run_train(
        config, "--training.steps", "10", "--training.seq_len", "128", *NO_CLIPPING,
        "--checkpoint.enable", "--debug.seed", "42", "--debug.deterministic",
        "--metrics.enable_tensorboard", "--metrics.save_tb_folder", "tb", *args,
        ngpu=ngpu, dump_folder=dump, env=env,
    ).check()  # fmt: skip
    (tb,) = [p for p in (dump / "tb").iterdir() if p.is_dir()]
    return run, tensorboard_scalars(
        tb, {"loss": "loss_metrics/global_avg_loss", "grad_norm": "grad_norm"}
    )


def _model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's entries of a DCP checkpoint folder, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, whole)
    state = torch.load(whole, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _mismatches(got: dict, want: dict, steps) -> list[str]:
    return [
        f"{kind} step {s}: {got[kind].get(s)!r} vs {want[kind].get(s)!r}"
        for kind in ("loss", "grad_norm")
        for s in steps
        if s not in got[kind]
        or not math.isclose(got[kind][s], want[kind][s], rel_tol=1e-4, abs_tol=1e-5)
    ]


def _pipeline_then_eager(root: Path, *args: str, env: dict | None = None):
    """PP 2 (tied, 1F1B) from its own init, saving every step; then 1-rank eager resumed
    from its step-1 (model, optimizer, schedule, data position). Returns both runs'
    scalars, eager's run and PP's step-1 model state."""
    pp_run, pp = _checkpointed(
        TIED, root / "pp", *PP2, "--training.local_batch_size", "8",
        "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "0", *args,
        ngpu=2, env=env,
    )  # fmt: skip
    (root / "eager" / "checkpoint").mkdir(parents=True)
    shutil.copytree(root / "pp" / "checkpoint" / "step-1", root / "eager" / "checkpoint" / "step-1")
    eager_run_, eager = _checkpointed(
        TIED, root / "eager", "--parallelize", "torchtitan", "--training.local_batch_size", "8",
        "--checkpoint.interval", "5", ngpu=1,
    )  # fmt: skip
    assert "Training starts at step 2" in eager_run_.log
    return pp, eager, _model_state(root / "pp" / "checkpoint" / "step-1")


@pytest.mark.slow
@pytest.mark.engine
def test_dcp_checkpoints_move_between_tied_pipeline_and_eager_both_ways(tmp_path):
    """A tied PP run's checkpoints hold the eager model's keys with the two tied names
    bit-equal after every optimizer step; eager resumed from PP's step 1, and PP resumed
    from eager's step 5, each repeat the other's later steps (losses, gradient norms)."""
    pp, eager, _ = _pipeline_then_eager(tmp_path)
    assert _mismatches(eager, pp, range(2, 11)) == []
    eager5 = _model_state(tmp_path / "eager" / "checkpoint" / "step-5")
    for step in range(1, 11):
        state = _model_state(tmp_path / "pp" / "checkpoint" / f"step-{step}")
        assert set(state) == set(eager5)  # the eager model's names, both tied ones
        assert torch.equal(state["tok_embeddings.weight"], state["lm_head.weight"]), step
    (tmp_path / "pp_resumed" / "checkpoint").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "eager" / "checkpoint" / "step-5",
        tmp_path / "pp_resumed" / "checkpoint" / "step-5",
    )
    resumed_run, resumed = _checkpointed(
        TIED, tmp_path / "pp_resumed", *PP2, "--training.local_batch_size", "8",
        "--checkpoint.interval", "100", ngpu=2,
    )  # fmt: skip
    assert "Training starts at step 6" in resumed_run.log
    assert _mismatches(resumed, eager, range(6, 11)) == []
    step10_resumed = _model_state(tmp_path / "pp_resumed" / "checkpoint" / "step-10")
    assert torch.equal(step10_resumed["tok_embeddings.weight"], step10_resumed["lm_head.weight"])


@pytest.mark.slow
@pytest.mark.engine
def test_tied_pipeline_without_init_sync_fails_eager_resume(tmp_path):
    """Each stage's copy of the tie left with its own init (the tie check off): PP's step-1
    checkpoint holds two values under the two names, and eager, resumed from it, cannot
    repeat PP's steps."""
    fault = "skip_tied_init_sync"
    pp, eager, step1 = _pipeline_then_eager(tmp_path, *UNCHECKED, env=fault_env(fault))
    mismatches = _mismatches(eager, pp, range(2, 11))
    print(f"{fault}: {len(mismatches)} of 18 mismatch, e.g. {mismatches[:2]}")
    assert len(mismatches) == 18
    assert not torch.equal(step1["tok_embeddings.weight"], step1["lm_head.weight"])


@pytest.mark.slow
@pytest.mark.engine
def test_each_stage_has_its_placement_file(tmp_path, monkeypatch, capsys):
    """--autoparallel.placement_file under PP: each stage saves its own file (the stage's
    name before the extension), the next start loads them instead of solving and trains the
    same losses, and a stage's file solved for another plan is refused before launch."""
    args = (
        *PP2, "--parallelism.pipeline_parallel_schedule", "1F1B",
        "--autoparallel.placement_file", "placements.json", "--autoparallel.graph_cache_dir", "",
        "--training.steps", "3", "--training.seq_len", "128", "--training.local_batch_size", "8",
        "--debug.seed", "42", "--debug.deterministic",
    )  # fmt: skip
    solved = run_train(TIED, *args, ngpu=2, dump_folder=tmp_path, log_ranks="0,1").check()
    names = ["placements.stage-layers.0-2.json", "placements.stage-layers.3-5.json"]
    assert sorted(p.name for p in tmp_path.glob("placements*.json")) == names
    loaded = run_train(TIED, *args, ngpu=2, dump_folder=tmp_path, log_ranks="0,1").check()
    for name in names:
        assert f"AutoParallel: saved placements to {tmp_path / name}" in solved.log
        assert f"AutoParallel: loaded placements from {tmp_path / name} (no solve)" in loaded.log
    assert loaded.rank_losses(1) == solved.rank_losses(1)  # the last stage prints the loss
    _assert_refused_in_process(
        monkeypatch, capsys,
        env={"NGPU": "2", "LOG_RANK": "0", "COMM_MODE": "", "CONFIG": TIED},
        args=(f"--dump_folder={tmp_path}", *args, "--training.seq_len", "64"),
        expected=(
            f"placement file {tmp_path / names[0]} was solved for model",
            "inputs [1, 128]; this run has model",
            "inputs [1, 64]",
        ),
        lines=1,
    )  # fmt: skip
