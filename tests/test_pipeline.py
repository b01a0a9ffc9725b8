"""Pipeline parallelism through AutoParallel: torchtitan's pipeline_llm splits the model and
calls the component once per stage module; each stage is planned on its own (token ids or
hidden states that require grad in, hidden states or logits out). What is not supported yet
is refused by the launcher, before any rank starts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.training import run_train
from tests.test_launch import _assert_refused_in_process
from tests.test_parity import SEED, _train, parity_problems

UNTIED = "llama3_debugmodel_untied_autoparallel"
PP2 = (
    "--parallelism.pipeline_parallel_degree",
    "2",
    "--parallelism.data_parallel_shard_degree",
    "1",
)

REFUSED = {
    "tied embeddings": (
        "llama3_debugmodel_autoparallel", (),
        "this config ties its embeddings, which torchtitan 0.3.0 refuses with pipeline",
    ),
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


@pytest.fixture(scope="module")
def untied_seed(tmp_path_factory) -> Path:
    """The untied debug model's seed checkpoint (step-0), seed 42."""
    dump = tmp_path_factory.mktemp("untied_seed")
    run_train(
        UNTIED, "--checkpoint.create_seed_checkpoint", "--checkpoint.enable", "--debug.seed", SEED,
        ngpu=1, dump_folder=dump,
    ).check()  # fmt: skip
    return dump / "checkpoint"


@pytest.fixture(scope="module")
def untied_eager(untied_seed, tmp_path_factory):
    return _train(
        UNTIED, untied_seed, tmp_path_factory.mktemp("untied_eager"),
        "--parallelize", "torchtitan", "--training.local_batch_size", "8", ngpu=1,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B"])
def test_pipeline_stages_planned_by_autoparallel_match_eager(
    schedule, untied_seed, untied_eager, tmp_path_factory
):
    """PP 2 on 2 gloo ranks (Interleaved1F1B: 2 stages a rank), 8 microbatches of 1 row, 20
    steps from one seed checkpoint, clipping off, against 1-rank eager: every loss, every
    gradient norm and every step-1 gradient."""
    dump = tmp_path_factory.mktemp(f"pp_{schedule}")
    pp = _train(
        UNTIED, untied_seed, dump, *PP2, "--parallelism.pipeline_parallel_schedule", schedule,
        "--training.local_batch_size", "8", ngpu=2,
    )  # fmt: skip
    stages = 4 if schedule == "Interleaved1F1B" else 2
    assert pp.log.count("AutoParallel: planning on mesh {'dp_shard': 1}, global batch 1 x") == (
        stages // 2  # rank 0's stages: the log shows rank 0
    )
    assert f"Using pipeline schedule {schedule} with 8 microbatches and {stages} stages" in pp.log
    plans = sorted(p.parent.name for p in (dump / "autoparallel").glob("*/plan.json"))
    assert len(plans) == stages, plans  # one plan per stage, each written by its rank
    assert parity_problems(untied_eager, pp) == {"losses": [], "grad_norms": [], "gradients": []}
    shutil.rmtree(dump / "checkpoint", ignore_errors=True)
