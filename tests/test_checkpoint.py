"""Checkpoints with aliases: DCP between the AutoParallel model and the eager model, both
ways. Resuming after a save was killed is an integration run (tests/support/integration/
runs.py: ap_shared_rope_1rank_kill_resume, run by tests/test_integration.py on CPU, and
gpu_kill_resume_dp_shard8): it resumes from step 2 and repeats steps 3-4 exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.checkpoint_roundtrip import CONFIG, LAYERS, TIED
from tests.support.training import REPO_ROOT

ROPE_CACHES = [f"layers.{i}.attention.rope.cache" for i in range(LAYERS)]


# --- DCP round trip: AutoParallel (2 gloo ranks) <-> eager (1 process) ---
# CONFIG is the shared-RoPE config (tied embeddings and one RoPE cache for every layer),
# cut to its first LAYERS layers.


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("dcp_roundtrip")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.checkpoint_roundtrip", str(workdir), "--ranks", "2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"round trip exited {proc.returncode}:\n{output[-6000:]}"
    results = json.loads((workdir / "results.json").read_text())
    results["workdir"] = workdir
    return results


def _assert_aliases_intact(report: dict, where: str) -> None:
    assert report["tied_parameters_one_object"], f"{where}: {TIED} are two tensors"
    assert report["tied_state_dict_one_storage"], f"{where}: state_dict holds two storages"
    assert report["parameter_groups"] == [sorted(TIED)], (where, report["parameter_groups"])
    assert report["buffer_groups"] == [sorted(ROPE_CACHES)], (where, report["buffer_groups"])
    assert report["verify"] == "ok", f"{where}: {report['verify']}"


@pytest.mark.slow
@pytest.mark.engine
def test_both_checkpoints_hold_the_same_keys_with_both_tied_names(roundtrip):
    assert (roundtrip["config"], roundtrip["layers"], roundtrip["ranks"]) == (CONFIG, LAYERS, 2)
    keys = roundtrip["checkpoint_keys"]
    assert keys["autoparallel"] == keys["eager"]
    assert set(TIED) <= set(keys["eager"])
    # The fused wqkv is saved in torchtitan's stock layout by its state_dict hooks, on both
    # sides; the RoPE cache is non-persistent.
    assert "layers.0.attention.qkv_linear.wq.weight" in keys["eager"]
    assert not any("wqkv" in k or "rope" in k for k in keys["eager"])
    assert keys["eager"] == roundtrip["eager_save"]["saved_keys"]
    for rank in roundtrip["autoparallel"]:
        assert rank["saved_keys"] == keys["eager"]
    # The two tied names hold one value in each checkpoint (read into separate tensors).
    assert roundtrip["checkpoint_tied_values_equal"] == {"eager": True, "autoparallel": True}


@pytest.mark.slow
@pytest.mark.engine
def test_autoparallel_side_is_sharded_and_tied_before_any_load(roundtrip):
    for rank in roundtrip["autoparallel"]:
        assert rank["placements"] == ["(Shard(dim=0),)"], rank["placements"]
        _assert_aliases_intact(rank["aliases_after_init"], "AutoParallel after init")
    _assert_aliases_intact(roundtrip["eager_save"]["aliases"], "eager after init")


@pytest.mark.slow
@pytest.mark.engine
def test_eager_checkpoint_loads_into_the_autoparallel_model(roundtrip):
    for number, rank in enumerate(roundtrip["autoparallel"]):
        loaded = rank["load_eager"]
        compare = loaded["compare"]
        assert not compare["missing"] and not compare["unexpected"], compare
        assert compare["differing"] == [], f"rank {number}: {compare}"
        assert loaded["load_changed_values"], "the load left the AutoParallel init in place"
        _assert_aliases_intact(loaded["aliases"], f"AutoParallel rank {number} after load")


@pytest.mark.slow
@pytest.mark.engine
def test_autoparallel_checkpoint_loads_into_the_eager_model(roundtrip):
    loaded = roundtrip["eager_load"]
    compare = loaded["compare"]
    assert not compare["missing"] and not compare["unexpected"], compare
    assert compare["differing"] == [], compare
    assert loaded["load_changed_values"], "the load left the eager init in place"
    _assert_aliases_intact(loaded["aliases"], "eager after load")
