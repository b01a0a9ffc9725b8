"""Real torchtitan training on CPU through run_train.sh, with torchtitan's own FSDP."""

from __future__ import annotations

import shutil

import pytest

from tests.support.training import run_train

CONFIG = "llama3_debugmodel_cpu"


@pytest.mark.slow
def test_two_ranks_train_with_torchtitan_fsdp(tmp_path):
    """Both ranks train and log every step; their logged losses and grad norms are not
    compared: torchtitan all-reduces them before logging, so they always agree."""
    run = run_train(
        CONFIG, "--training.steps", "6", ngpu=2, log_ranks="0,1", dump_folder=tmp_path
    ).check()
    assert sorted(run.losses) == [0, 1], "both ranks must print their step lines"
    assert sorted(run.losses[1]) == sorted(run.losses[0]), "rank 1 skipped or added steps"
    losses = run.rank_losses()
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.3, f"loss did not fall: {losses}"
    assert "training on CPU with gloo" in run.log
    assert "Applied FSDP to the model" in run.log


@pytest.mark.slow
def test_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    common = [
        "--training.steps", "6",
        "--debug.seed", "7", "--debug.deterministic",
        "--checkpoint.enable", "--checkpoint.interval", "3",
    ]  # fmt: skip
    full = run_train(CONFIG, *common, ngpu=1, dump_folder=tmp_path / "full").check()
    assert (tmp_path / "full" / "checkpoint" / "step-3").is_dir()

    # A second run whose folder holds only the step-3 checkpoint resumes at step 4.
    resumed_dir = tmp_path / "resumed" / "checkpoint"
    shutil.copytree(tmp_path / "full" / "checkpoint" / "step-3", resumed_dir / "step-3")
    resumed = run_train(CONFIG, *common, ngpu=1, dump_folder=tmp_path / "resumed").check()

    assert "Training starts at step 4" in resumed.log
    assert sorted(resumed.losses[0]) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[0][step] == pytest.approx(full.losses[0][step], abs=1e-5), step
