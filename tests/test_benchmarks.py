"""benchmarks/run.py's bookkeeping: medians, ratios and tables from run results (no timing
is asserted here), and its AutoParallel half skipping with a line when the engine is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks import run as bench
from tests._training import REPO_ROOT

PHASES = {
    "alias_capture": 0.01,
    "trace": 8.0,
    "solve": 1.0,
    "apply": 1.0,
    "alias_restore": 0.005,
    "alias_verify": 0.005,
    "init": 0.5,
}


def _result(key: str, round_index: int, step_s: list[float], **kwargs) -> bench.RunResult:
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


def test_summary_takes_medians_across_rounds_and_compares_to_the_baseline():
    startup = {"seconds": PHASES, "alias_extra_bytes": 0, "unique_storage_bytes": 123}
    results = [
        _result("titan_fsdp", 0, [2.0, 2.0, 9.0]),
        _result("titan_fsdp", 1, [2.2, 2.2, 2.2]),
        _result("titan_fsdp", 2, [1.8, 1.8]),
        _result("ap_fsdp_compiled", 0, [1.0, 1.0], startup=startup),
        _result("ap_fsdp_compiled", 1, [1.1, 50.0, 1.1], startup=startup),
        bench.RunResult("ap_ddp", 0, returncode=1, log_tail="Traceback: boom"),
    ]
    summary = bench.summarize(results, tokens_per_step=4096)
    assert summary["titan_fsdp"]["step_s"] == 2.0  # median of round medians 2.0, 2.2, 1.8
    assert summary["titan_fsdp"]["tokens_per_s"] == 2048
    assert summary["ap_fsdp_compiled"]["step_s"] == 1.05
    assert summary["ap_fsdp_compiled"]["peak_rss_gib_max_rank"] == 1.2
    assert summary["ap_ddp"] == {"label": "AutoParallel DDP-like", "failed": "Traceback: boom"}
    assert "torch_ddp" not in summary  # not run

    report = {
        "date": "2026-11-25 12:00", "machine": "x86_64 2 cores", "backend": "gloo", "ngpu": 2,
        "rounds": 3, "warmup": 3, "steps": 12, "summary": summary,
        "warm_starts": {
            "ap_fsdp_compiled": {
                "label": "AutoParallel FSDP-like compiled", "cold_s": 200.0, "warm_s": 100.0,
                "cold_phases_s": PHASES, "warm_phases_s": PHASES | {"solve": 0.0},
            }
        },
    }  # fmt: skip
    table = bench._markdown(report)
    assert "| AutoParallel FSDP-like compiled | 1.050 | 3,901 | 0.53x torchtitan FSDP |" in table
    assert "| AutoParallel DDP-like | failed |" in table
    assert "| 4.0 | 5 all_gather, 3 reduce_scatter |" in table  # state MiB, collectives
    # Alias share of trace + solve + apply: 0.02 / 10.
    assert "| 0.20% | 0 |" in table
    # Warm start: phases, and the rest (launch, build, compile, step 1) = 100 - 9.52.
    assert "| 200.0 | 100.0 | 8.0 / 0.0 / 1.0 / 0.5 | 90.5 |" in table


def test_without_autoparallel_the_autoparallel_half_skips_with_a_line(tmp_path):
    shadow = tmp_path / "shadow" / "autoparallel"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named autoparallel')\n")
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
    assert (tmp_path / "out" / "latest.md").exists() and (tmp_path / "out" / "latest.png").exists()
