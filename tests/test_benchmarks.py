"""benchmarks/run.py's bookkeeping: medians, ratios and tables from run results (no timing
is asserted here), and its AutoParallel half skipping with a line when the engine is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import run as bench
from tests.support.training import REPO_ROOT

PHASES = {
    "alias_capture": 0.01,
    "trace": 8.0,
    "solve": 1.0,
    "apply": 1.0,
    "alias_restore": 0.005,
    "alias_verify": 0.005,
    "init": 0.5,
}


STEPS = 3
LOSSES = {4: 7.5, 5: 7.25, 6: 7.0}  # the timed steps after 3 warm-up steps


def _result(key: str, round_index: int, step_s: list[float], **kwargs) -> bench.RunResult:
    kwargs.setdefault("losses", dict(LOSSES))
    return bench.RunResult(
        key,
        round_index,
        returncode=0,
        start_to_first_step_s=20.0 + round_index,
        step_s=step_s,
        peak_rss_gib={0: 1.0, 1: 1.2},
        state_bytes={0: {"params": 2**20, "grads": 2**20, "optimizer": 2 * 2**20}},
        collectives={"all_gather": 5, "reduce_scatter": 3},
        **kwargs,
    )


def _report(results: list[bench.RunResult], rounds: int) -> dict:
    summary = bench.summarize(results, ngpu=2, rounds=rounds, steps=STEPS)
    return {
        "date": "2026-11-25 12:00", "machine": "x86_64 2 cores", "backend": "gloo", "ngpu": 2,
        "rounds": rounds, "warmup": 3, "steps": STEPS, "summary": summary,
        "ratios": bench.ratios(summary),
    }  # fmt: skip


def test_summary_takes_medians_across_rounds_and_compares_to_the_best_baseline():
    startup = {"seconds": PHASES, "alias_extra_bytes": 0, "unique_storage_bytes": 123}
    results = [
        _result("titan_fsdp", 0, [2.0, 2.0, 9.0]),
        _result("titan_fsdp", 1, [2.2, 2.2, 2.2]),
        _result("titan_fsdp", 2, [1.8, 1.8, 1.8]),
        # The compiled baseline is faster: the ratio is against it, named.
        *(_result("titan_fsdp_compiled", r, [1.5, 1.5, 1.5]) for r in range(3)),
        _result("ap_fsdp_compiled", 0, [1.0, 1.0, 1.0], startup=startup),
        _result("ap_fsdp_compiled", 1, [1.1, 50.0, 1.1], startup=startup),
        _result("ap_fsdp_compiled", 2, [1.05, 1.05, 1.05], startup=startup),
    ]
    report = _report(results, rounds=3)
    summary = report["summary"]
    assert summary["titan_fsdp"]["step_s"] == 2.0  # median of round medians 2.0, 2.2, 1.8
    assert summary["titan_fsdp"]["tokens_per_s"] == 2048
    assert summary["ap_fsdp_compiled"]["step_s"] == 1.05
    assert summary["ap_fsdp_compiled"]["peak_rss_gib_max_rank"] == 1.2
    assert summary["ap_fsdp_compiled"]["losses_vs_reference"] == {"agree": True, "max_abs_diff": 0}
    ratio = report["ratios"]["ap_fsdp_compiled"]
    assert ratio["baseline"] == "titan_fsdp_compiled" and ratio["peak_rss_ratio"] == 1.0
    assert ratio["step_s_ratio"] == pytest.approx(0.7)
    assert "torch_ddp" not in summary  # not run

    report["warm_starts"] = {
        "titan_fsdp_compiled": {
            "label": "torchtitan FSDP + per-block compile", "cold_s": 30.0, "warm_s": 20.0,
            "warm_rounds_s": [21.0, 20.0, 19.0], "cold_phases_s": {}, "warm_phases_s": {},
        },
        "ap_fsdp_compiled": {
            "label": "AutoParallel FSDP-like compiled", "cold_s": 200.0, "warm_s": 100.0,
            "warm_rounds_s": [100.0, 90.0, 110.0], "cold_phases_s": PHASES,
            "warm_phases_s": PHASES | {"solve": 0.0, "graph_cache_load": 0.0},
            "vs": {"baseline": "titan_fsdp_compiled", "warm_s_ratio": 5.0},
        },
    }  # fmt: skip
    table = bench._markdown(report)
    row = "| AutoParallel FSDP-like compiled | 1.050 | 3,901 | 3 / 3 | agree (max 0) "
    assert row + "| 0.70x torchtitan FSDP + per-block compile |" in table
    assert "| 4.0 | 5 all_gather, 3 reduce_scatter |" in table  # state MiB, collectives
    # Alias share of trace + solve + apply: 0.02 / 10.
    assert "| 0.20% | 0 |" in table
    # Warm starts: median, rounds, ratio to torchtitan's warm start, phases, and the rest
    # (launch, build, compile, step 1) = 100 - 9.5.
    assert (
        "| AutoParallel FSDP-like compiled | 200.0 | 100.0 | 100.0, 90.0, 110.0 "
        "| 5.00x torchtitan FSDP + per-block compile | 8.0 / 0.0 / 1.0 / 0.0 / 0.5 | 90.5 |"
    ) in table
    assert "| torchtitan FSDP + per-block compile | 30.0 | 20.0 | 21.0, 20.0, 19.0 |  |" in table


def test_the_floor_is_the_faster_runs_kernels_over_the_baselines_step():
    """Kernel seconds (matmul + attention of the profiled step) give each ratio a floor:
    the faster of the two runs' kernels over the baseline's step. A variant whose rounds
    did not all time their kernels gets no kernel figure, and its ratios no floor."""
    kernels = {"matmul": 0.75, "attention": 0.25}
    results = [
        *(_result("titan_fsdp", r, [2.0] * 3, kernel_s={"matmul": 0.9, "attention": 0.3})
          for r in range(3)),
        *(_result("ap_fsdp", r, [1.8] * 3, kernel_s=dict(kernels)) for r in range(3)),
        *(_result("torch_ddp", r, [1.6] * 3, kernel_s=dict(kernels)) for r in range(3)),
        *(_result("ap_ddp", r, [1.7] * 3, kernel_s=dict(kernels) if r else {})
          for r in range(3)),
    ]  # fmt: skip
    report = _report(results, rounds=3)
    assert report["summary"]["titan_fsdp"]["kernel_s_per_step"] == pytest.approx(1.2)
    assert report["summary"]["ap_fsdp"]["kernel_s_per_step"] == pytest.approx(1.0)
    assert "kernel_s_per_step" not in report["summary"]["ap_ddp"]
    assert report["ratios"]["ap_fsdp"]["floor_ratio"] == pytest.approx(1.0 / 2.0)
    assert "floor_ratio" not in report["ratios"]["ap_ddp"]
    table = bench._markdown(report)
    assert "| 0.90x torchtitan FSDP (floor 0.50x) | 1.000 |" in table
    assert "| 1.06x torch DDP |  |" in table


def test_a_variant_that_trains_something_else_gets_no_ratio_and_is_no_baseline():
    other = {4: 7.5, 5: 7.26, 6: 7.01}  # e.g. gradients averaged where they must be summed
    results = [
        _result("titan_fsdp", 0, [2.0] * STEPS),
        _result("torch_ddp", 0, [1.0] * STEPS, losses=other),  # faster, but not the same
        _result("torch_ddp_compiled", 0, [1.6] * STEPS),
        _result("ap_ddp", 0, [1.5] * STEPS),
        _result("ap_fsdp", 0, [1.5] * STEPS, losses=other),
    ]
    report = _report(results, rounds=1)
    assert report["ratios"]["ap_ddp"]["baseline"] == "torch_ddp_compiled"
    assert report["ratios"]["ap_ddp"]["step_s_ratio"] == 1.5 / 1.6
    no_ratio = report["ratios"]["ap_fsdp"]
    assert no_ratio["baseline"] is None and no_ratio["step_s_ratio"] is None
    assert "losses differ from torchtitan FSDP's by up to 0.01" in no_ratio["why"]
    assert "it trains something else" in no_ratio["why"]
    table = bench._markdown(report)
    assert "| torch DDP | 1.000 | 4,096 | 1 / 1 | differ |" in table
    assert "| AutoParallel FSDP-like | 1.500 | 2,731 | 1 / 1 | differ | no ratio: losses" in table


def test_failed_and_partial_rounds_are_reported_and_cost_the_ratio():
    results = [
        *(_result("titan_fsdp", r, [2.0] * STEPS) for r in range(2)),
        _result("ap_fsdp", 0, [1.5] * STEPS),
        _result("ap_fsdp", 1, [1.5], losses={4: 7.5}),  # killed after one timed step
        bench.RunResult("ap_ddp", 0, returncode=1, log_tail="Traceback: boom"),
        bench.RunResult("ap_ddp", 1, returncode=1, log_tail="Traceback: boom"),
    ]
    report = _report(results, rounds=2)
    summary = report["summary"]
    partial = summary["ap_fsdp"]
    assert (partial["rounds_run"], partial["rounds_used"]) == (2, 1)
    assert partial["steps_timed_by_round"] == [3, 1]
    assert partial["unused_rounds"][0] | {"log_tail": ""} == {
        "round": 1, "returncode": 0, "steps_timed": 1, "log_tail": "",
    }  # fmt: skip
    assert report["ratios"]["ap_fsdp"]["why"] == "1 of 2 rounds used"
    failed = summary["ap_ddp"]
    assert failed["rounds_used"] == 0 and "step_s" not in failed
    assert failed["unused_rounds"][1]["log_tail"] == "Traceback: boom"
    assert report["ratios"]["ap_ddp"]["why"] == "0 of 2 rounds used"
    table = bench._markdown(report)
    assert "| AutoParallel FSDP-like | 1.500 | 2,731 | 1 / 2 | " in table
    assert "no ratio: 1 of 2 rounds used" in table
    assert "| AutoParallel DDP-like | failed | | 0 / 2 |" in table
    assert "- AutoParallel FSDP-like, round 2: exit 0, 1 steps timed" in table
    assert "- AutoParallel DDP-like, round 1: exit 1, 0 steps timed" in table


def test_warm_starts_are_compared_only_where_the_losses_agree(tmp_path, monkeypatch):
    """Each AutoParallel variant's warm starts against its torchtitan baseline's, eager and
    expert-parallel alike: medians of the warm rounds, and a ratio only where every start
    trained what the baseline's cold start did (its timed-step loss)."""
    loss = {"titan_moe_ep": 7.0, "ap_moe_ep": 7.0, "titan_fsdp": 7.5, "ap_fsdp": 7.6}
    seconds = {"titan_moe_ep": 20.0, "ap_moe_ep": 18.0, "titan_fsdp": 10.0, "ap_fsdp": 9.0}

    def run_variant(variant, *, round_index, seed_checkpoint, **kwargs):
        key = variant.key
        assert seed_checkpoint == tmp_path / variant.suite
        return bench.RunResult(
            key, round_index, returncode=0, losses={3: loss[key]},
            start_to_first_step_s=seconds[key] * (3 if round_index == 0 else 1) + round_index,
        )  # fmt: skip

    monkeypatch.setattr(bench, "run_variant", run_variant)
    starts = bench.warm_starts(
        ngpu=2, dump_root=tmp_path, keys=["titan_fsdp", "ap_fsdp", "titan_moe_ep", "ap_moe_ep"],
        seed_checkpoints={"dense": tmp_path / "dense", "moe": tmp_path / "moe"},
    )  # fmt: skip
    ep = starts["ap_moe_ep"]
    assert (ep["cold_s"], ep["warm_rounds_s"], ep["warm_s"]) == (54.0, [19.0, 20.0, 21.0], 20.0)
    assert ep["vs"]["warm_s_ratio"] == 20.0 / 22.0  # the baseline's median: 21, 22, 23
    dense = starts["ap_fsdp"]["vs"]
    assert "warm_s_ratio" not in dense
    assert "losses differ from torchtitan FSDP's by up to 0.1" in dense["losses"]["why"]
    table = bench._markdown(_report([], rounds=0) | {"warm_starts": starts})
    assert (
        "| MoE: AutoParallel EP 2 | 54.0 | 20.0 | 19.0, 20.0, 21.0 | 0.91x MoE: torchtitan" in table
    )
    assert "no ratio: losses differ from torchtitan FSDP's" in table
    assert "| variant | s/step" not in table  # no rounds: no step-time table


def test_without_autoparallel_the_autoparallel_half_skips_with_a_line(tmp_path):
    """Also without matplotlib (only the bench extra has it): JSON and table, one line on
    how to get the chart, no traceback."""
    for name in ("autoparallel", "matplotlib"):
        shadow = tmp_path / "shadow" / name
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text(f"raise ImportError('No module named {name}')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{REPO_ROOT}"}
    proc = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.run", "--rounds", "0", "--no-warm",
            "--variants", "titan_fsdp,ap_fsdp,ap_ddp_compiled",
            "--output", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
        ],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "AutoParallel is not installed: skipping ['ap_fsdp', 'ap_ddp_compiled']" in proc.stdout
    report = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert report["summary"] == {} and "scaling" not in report
    assert (tmp_path / "out" / "latest.md").exists()
    assert not (tmp_path / "out" / "latest.png").exists()
    assert "no chart: matplotlib is not installed (pip install -e '.[bench]'" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_runs_work_in_a_new_folder_and_a_reused_round_folder_starts_clean(tmp_path, monkeypatch):
    """Without --work, each benchmark gets a new temporary folder; with it, a round folder
    an earlier benchmark left (its placement file, graph cache) is emptied before the
    round runs, so no earlier or planted cache feeds it."""
    import tempfile

    dumps: dict[Path, list[str]] = {}

    def run_variant(variant, *, round_index, dump, **kwargs):
        dumps[dump] = sorted(p.name for p in dump.rglob("*")) if dump.exists() else []
        return _result(variant.key, round_index, [1.0] * STEPS)

    monkeypatch.setattr(bench, "run_variant", run_variant)
    monkeypatch.setattr(bench, "make_seed_checkpoint", lambda work, suite: work / "seed")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # mkdtemp's parent
    (tmp_path / "tmp").mkdir()
    args = ["--rounds", "1", "--steps", str(STEPS), "--variants", "titan_fsdp", "--no-warm",
            "--no-scaling", "--output", str(tmp_path / "out")]  # fmt: skip
    assert bench.main(args) == 0 and bench.main(args) == 0
    works = [dump.parent for dump in dumps]
    assert len(set(works)) == 2 and {w.parent for w in works} == {tmp_path / "tmp"}, works

    stale = tmp_path / "work" / "round0-titan_fsdp"
    (stale / "graph_cache").mkdir(parents=True)
    (stale / "graph_cache" / "rank0.pkl").write_bytes(b"planted")
    assert bench.main([*args, "--work", str(tmp_path / "work")]) == 0
    assert dumps[stale] == []


def test_cold_start_table_keeps_measured_points_and_measures_the_rest(monkeypatch):
    """benchmarks/scaling.py --named: a point already in the results file is kept (a large
    MoE point takes minutes), every other one is measured, and the table shows each."""
    from benchmarks import scaling

    measured = []

    def run_point(args):
        measured.append(args)
        name, mesh, ep = args[1], int(args[3]), int(args[5])
        return {"config": name, "layers": 2, "mesh": mesh, "ep": ep, "trace": 1.0,
                "solve": 0.5, "apply": 2.0, "compile": 4.0, "compiled_plan": True,
                "experts": [2, 128] if ep > 1 else None,
                "collectives": {"all_gather": 3, "all_to_all": 4 * (ep > 1)}}  # fmt: skip

    monkeypatch.setattr(scaling, "_run_point", run_point)
    # Kept from an earlier results file: a compiled config's point measured before Inductor
    # compiled at apply (no compile time).
    old_name, old_mesh, old_ep = scaling.NAMED[-1]
    old = run_point(["--config", old_name, "--mesh", str(old_mesh), "--ep", str(old_ep)])
    del old["compile"], old["compiled_plan"]
    first_name, first_mesh, first_ep = scaling.NAMED[0]
    done = [
        run_point(["--config", first_name, "--mesh", str(first_mesh), "--ep", str(first_ep)]),
        old,
    ]
    measured.clear()
    points = scaling.named_table(done)
    assert points[0] is done[0] and points[-1] is old
    assert len(measured) == len(scaling.NAMED) - 2
    assert [(p["config"], p["mesh"], p["ep"]) for p in points] == list(scaling.NAMED)
    table = scaling.named_markdown(points)
    assert table.count("\n| ") == len(scaling.NAMED) + 1  # header and one row a point
    # The debug config is eager; the large ones compile at apply, the old point at step 1.
    assert "| 3.5 |  |  | 3 all_gather, 0 all_to_all (after eager bucketing) |" in table
    assert (
        "| 3.5 | 4.0 | 2 of 128 | 3 all_gather, 4 all_to_all (after Inductor's bucketing) |"
        in table
    )
    assert (
        "| 3.5 | at step 1 | 2 of 128 | 3 all_gather, 4 all_to_all "
        "(planned, bucketed at step 1 by Inductor) |" in table
    )
