"""Pipeline parallelism through AutoParallel: torchtitan's pipeline_llm splits the model and
calls the component once per stage module; each stage is planned on its own (token ids or
hidden states that require grad in, hidden states or logits out). Embeddings tied across
stages are kept one tensor in value (torchtitan_ext.tied_stages). What is not supported yet
is refused by the launcher, before any rank starts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support.training import run_train
from tests.test_launch import _assert_refused_in_process
from tests.test_parity import (
    REPO_ROOT,
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

REFUSED = {
    "split-backward schedule": (
        UNTIED, ("--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble"),
        "splits each backward into input and weight gradients",
    ),
    "placement file": (
        UNTIED, ("--autoparallel.placement_file", "placements.json"),
        "--autoparallel.placement_file hold one plan, and each pipeline stage has its own",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_pipeline_parallelism_does_not_do_yet_is_refused(case, tmp_path, monkeypatch, capsys):
    config, args, expected = REFUSED[case]
    _assert_refused_in_process(
        monkeypatch, capsys,
        env={"NGPU": "2", "LOG_RANK": "0", "COMM_MODE": "", "CONFIG": config},
        args=(f"--dump_folder={tmp_path}", *PP2, *args),
        expected=("--parallelism.pipeline_parallel_degree 2: ", expected),
        lines=1,
    )  # fmt: skip


# run -> (config, schedule, ranks, flags): global batch 8 a step, in microbatches of 1 row.
PIPELINES = {
    "tied_1F1B": (TIED, "1F1B", 2, PP2),
    "tied_Interleaved1F1B": (TIED, "Interleaved1F1B", 2, PP2),
    "shared_rope_1F1B": (SHARED_ROPE, "1F1B", 2, PP2),
    "untied_Interleaved1F1B": (UNTIED, "Interleaved1F1B", 2, PP2),
}  # fmt: skip


def _eager_and_seed(config: str, tmp_path_factory) -> tuple:
    # The shared-RoPE config has the tied one's parameters: one seed checkpoint.
    seed = seed_checkpoint_of(
        UNTIED if config == UNTIED else TIED, tmp_path_factory.mktemp("seed")
    )
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
    config, schedule, _, _ = PIPELINES[run]
    eager, seed = _eager_and_seed(config, tmp_path_factory)
    dump = tmp_path_factory.mktemp(f"pp_{run}")
    pp = _pipeline(run, seed, dump)
    stages = 4 if schedule == "Interleaved1F1B" else 2
    assert pp.log.count("AutoParallel: planning on mesh {'dp_shard': 1}, global batch 1 x") == (
        stages // 2  # rank 0's stages: the log shows rank 0
    )
    assert f"Using pipeline schedule {schedule} with 8 microbatches and {stages} stages" in pp.log
    plans = sorted(p.parent.name for p in (dump / "autoparallel").glob("*/plan.json"))
    assert len(plans) == stages, plans  # one plan per stage, each written by its rank
    if config != UNTIED:
        assert {"tok_embeddings.weight", "lm_head.weight"} <= set(pp.grads)
    assert parity_problems(eager, pp) == {"losses": [], "grad_norms": [], "gradients": []}
    shutil.rmtree(dump / "checkpoint", ignore_errors=True)


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize(
    "fault", ["skip_tied_grad_sum"]
)
def test_tied_pipeline_parity_fails_on_an_injected_fault(fault, tmp_path_factory):
    """The tie's gradient left unsummed across stages must fail parity: the first stage's
    tok_embeddings and the last stage's lm_head each get their own part of the gradient."""
    eager, seed = _eager_and_seed(TIED, tmp_path_factory)
    faulty = _pipeline(
        "tied_1F1B", seed, tmp_path_factory.mktemp(fault), steps=3,
        env={
            "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT / "tests" / "support" / "faults"), str(REPO_ROOT)]
            ),
            "TORCHTITAN_EXT_TEST_FAULT": fault,
        },
    )  # fmt: skip
    assert f"[fault-shim] {fault}" in faulty.log
    problems = parity_problems(eager, faulty)
    print(f"{fault}: {problems}")
    assert problems["losses"] and problems["grad_norms"], problems
    assert any(p.startswith(("tok_embeddings.weight", "lm_head.weight")) for p in problems["gradients"])
