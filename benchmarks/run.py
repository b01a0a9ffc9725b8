"""What AutoParallel and alias handling cost, against torchtitan's and torch's own
parallelization, in one command:

    python -m benchmarks.run                      # every variant, 3 interleaved rounds
    python -m benchmarks.run --rounds 1 --variants titan_fsdp,ap_fsdp --no-scaling

Every variant of a suite trains the same thing: dense, torchtitan's llama3 debug model (tied
embeddings); moe, the Qwen3 MoE debug model (2 layers, 64 experts, tied); pp, the llama3
debug model untied, in 2 pipeline stages (1F1B, 8 microbatches): the same data,
shapes and dtype, from one seed checkpoint per suite made at the start, on --ngpu ranks
(gloo on CPU), and the benchmark checks it: each run's per-step losses (full precision,
from TensorBoard) must agree with its suite's reference variant's within LOSS_ATOL over the
timed steps, or the variant gets no ratio, with the reason. Rounds interleave the variants
(rotating their order), so machine noise hits all of them; medians are taken within a run
(steps) and across rounds. A round that failed or timed fewer steps is reported (rounds
used / run) and not used; a variant with fewer used rounds than asked gets no ratio. Each
AutoParallel variant is compared with the fastest of its baselines' eager and compiled
forms. Warm starts (--no-warm skips them): each AutoParallel variant of WARM_BASELINES and
its torchtitan baseline start once cold, then 3 interleaved times reusing that dump folder
(placement file, graph cache, compile caches); start to step 1, medians. Writes
<output>/latest.json, latest.md and latest.png (--name sets the stem; the
chart needs the bench extra's matplotlib) and prints the ratios last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TIME = re.compile(r"\[titan\] (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
_STEP = re.compile(r"^\[rank(\d+)\]:.*step:\s*(\d+)\s+loss:.*memory:\s*([\d.]+)GiB")


LOSS_ATOL = 1e-5
"""Largest per-step loss difference from the reference variant for the same training."""
SEED = "42"
TB_LOSS_TAG = "loss_metrics/global_avg_loss"


@dataclass(frozen=True)
class Suite:
    """One model every variant of the suite trains, from one seed checkpoint."""

    config: str
    """benchmarks/config_registry.py config of the seed checkpoint (and of the variants)."""
    reference: str
    """The variant whose losses every other variant of the suite is compared with."""
    tokens_per_rank_step: int
    """local batch x seq_len."""


SUITES = {
    "dense": Suite("llama3_debugmodel_bench", "titan_fsdp", 8 * 256),
    "moe": Suite("qwen3_moe_debug_bench", "titan_moe_ep", 4 * 256),
    # PP 2 on 2 ranks: one batch of 8 x 256 a step, through both ranks.
    "pp": Suite("llama3_debugmodel_untied_bench", "titan_pp", 4 * 256),
}


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    config: str
    args: tuple[str, ...] = ()
    baselines: tuple[str, ...] = ()
    """Keys of the variants this one is compared to: the fastest of them that trains the
    same (losses agree) and ran every round."""
    autoparallel: bool = False
    suite: str = "dense"


_COMPILE = ("--compile.enable",)
_REPLICATE = (
    "--parallelism.data_parallel_replicate_degree", "2",
    "--parallelism.data_parallel_shard_degree", "1",
)  # fmt: skip
_TITAN = ("--parallelize", "torchtitan")
_FSDP = ("titan_fsdp", "titan_fsdp_compiled")
_DDP = ("torch_ddp", "torch_ddp_compiled")
_EP = ("--parallelism.expert_parallel_degree", "2")
# torchtitan's EP on gloo needs its DTensor backend: its spmd_types backend exchanges tokens
# with a list all_to_all, which gloo refuses for uneven splits.
_TITAN_EP = (*_TITAN, *_EP, "--parallelism.spmd_backend", "full_dtensor")
_MOE = "qwen3_moe_debug_bench"
_PP = (
    "--parallelism.pipeline_parallel_degree", "2",
    "--parallelism.data_parallel_shard_degree", "1",
    "--parallelism.pipeline_parallel_schedule", "1F1B",
)  # fmt: skip
_TITAN_PP = ("titan_pp", "titan_pp_compiled")
VARIANTS = [
    Variant("titan_fsdp", "torchtitan FSDP", "llama3_debugmodel_bench", _TITAN),
    Variant(
        "titan_fsdp_compiled", "torchtitan FSDP + per-block compile", "llama3_debugmodel_bench",
        _TITAN + _COMPILE,
    ),
    Variant("torch_ddp", "torch DDP", "llama3_debugmodel_ddp_bench"),
    Variant("torch_ddp_compiled", "torch DDP compiled", "llama3_debugmodel_ddp_bench", _COMPILE),
    Variant(
        "ap_fsdp", "AutoParallel FSDP-like", "llama3_debugmodel_bench",
        baselines=_FSDP, autoparallel=True,
    ),
    Variant(
        "ap_fsdp_compiled", "AutoParallel FSDP-like compiled", "llama3_debugmodel_bench",
        _COMPILE, baselines=_FSDP, autoparallel=True,
    ),
    Variant(
        "ap_ddp", "AutoParallel DDP-like", "llama3_debugmodel_bench", _REPLICATE,
        baselines=_DDP, autoparallel=True,
    ),
    Variant(
        "ap_ddp_compiled", "AutoParallel DDP-like compiled", "llama3_debugmodel_bench",
        _REPLICATE + _COMPILE, baselines=_DDP, autoparallel=True,
    ),
    Variant("titan_moe_ep", "MoE: torchtitan EP 2", _MOE, _TITAN_EP, suite="moe"),
    Variant(
        "titan_moe_ep_compiled", "MoE: torchtitan EP 2 + per-block compile", _MOE,
        (*_TITAN_EP, *_COMPILE), suite="moe",
    ),
    Variant(
        "ap_moe", "MoE: AutoParallel, solver's plan (no EP)", _MOE,
        baselines=("titan_moe_ep",), autoparallel=True, suite="moe",
    ),
    Variant(
        "ap_moe_ep", "MoE: AutoParallel EP 2", _MOE, _EP,
        baselines=("titan_moe_ep",), autoparallel=True, suite="moe",
    ),
    Variant(
        "ap_moe_compiled", "MoE: AutoParallel, solver's plan (no EP), compiled", _MOE,
        _COMPILE, baselines=("titan_moe_ep",), autoparallel=True, suite="moe",
    ),
    Variant(
        "ap_moe_ep_compiled", "MoE: AutoParallel EP 2, compiled", _MOE, (*_EP, *_COMPILE),
        baselines=("titan_moe_ep", "titan_moe_ep_compiled"), autoparallel=True, suite="moe",
    ),
    # torchtitan refuses tied embeddings with PP: the PP suite trains the untied model.
    Variant(
        "titan_pp", "PP: torchtitan PP 2", "llama3_debugmodel_untied_bench", (*_TITAN, *_PP),
        suite="pp",
    ),
    Variant(
        "titan_pp_compiled", "PP: torchtitan PP 2 + per-block compile",
        "llama3_debugmodel_untied_bench", (*_TITAN, *_PP, *_COMPILE), suite="pp",
    ),
    Variant(
        "ap_pp", "PP: AutoParallel PP 2", "llama3_debugmodel_untied_bench", _PP,
        baselines=_TITAN_PP, autoparallel=True, suite="pp",
    ),
    Variant(
        "ap_pp_compiled", "PP: AutoParallel PP 2 compiled", "llama3_debugmodel_untied_bench",
        (*_PP, *_COMPILE), baselines=_TITAN_PP, autoparallel=True, suite="pp",
    ),
]  # fmt: skip
BY_KEY = {v.key: v for v in VARIANTS}


@dataclass
class RunResult:
    variant: str
    round: int
    returncode: int
    start_to_first_step_s: float = float("nan")
    step_s: list[float] = field(default_factory=list)
    peak_rss_gib: dict[int, float] = field(default_factory=dict)
    state_bytes: dict[int, dict[str, int]] = field(default_factory=dict)
    collectives: dict[str, int] = field(default_factory=dict)
    collective_payload_bytes: int = 0
    kernel_s: dict[str, float] = field(default_factory=dict)
    """The profiled step's matmul and attention kernel seconds on rank 0 (CPU)."""
    startup: dict = field(default_factory=dict)
    """AutoParallel runs: the component's start-up phases (startup.json)."""
    plan: dict = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)
    """step -> loss of the timed steps, full precision (TensorBoard)."""
    log_tail: str = ""

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s) if self.step_s else float("nan")


def _timestamp(line: str) -> float | None:
    match = _TIME.search(line)
    if match is None:
        return None
    return datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _env(ngpu: int, dump: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "LOG_RANK": ",".join(str(r) for r in range(ngpu)),
        # Cold compile caches unless a warm start reuses this dump folder on purpose.
        "TORCHINDUCTOR_CACHE_DIR": str(dump / "autoparallel" / "compile_cache"),
    }


def make_seed_checkpoint(work: Path, suite: Suite) -> Path:
    """torchtitan's seed checkpoint of a suite's model (1 rank, seed SEED): every run of the
    suite starts from it. Initializing instead would not train the same thing: a sharded
    init draws other random numbers than a replicated one."""
    dump = work / f"seed-{suite.config}"
    shutil.rmtree(dump, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
        "-m", "torchtitan_ext.train", "--module", "benchmarks.config_registry",
        "--config", suite.config, f"--dump_folder={dump}",
        "--parallelize", "torchtitan", "--checkpoint.enable",
        "--checkpoint.create_seed_checkpoint", "--debug.seed", SEED,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=_env(1, dump), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    checkpoint = dump / "checkpoint"
    if proc.returncode != 0 or not (checkpoint / "step-0" / ".metadata").is_file():
        raise RuntimeError(f"seed checkpoint failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return checkpoint


def tensorboard_losses(dump: Path) -> dict[int, float]:
    """step -> loss of the newest TensorBoard run under <dump>/tb."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = (
        sorted(p for p in (dump / "tb").iterdir() if p.is_dir()) if (dump / "tb").is_dir() else []
    )
    if not runs:
        return {}
    events = EventAccumulator(str(runs[-1]))
    events.Reload()
    return {s.step: s.value for s in events.Scalars(TB_LOSS_TAG)}


def run_variant(
    variant: Variant,
    *,
    round_index: int,
    ngpu: int,
    warmup: int,
    steps: int,
    dump: Path,
    seed_checkpoint: Path,
    extra: tuple[str, ...] = (),
) -> RunResult:
    """Train ``variant`` from the seed checkpoint for warmup + steps timed steps + 1 step
    whose collectives are counted."""
    total = warmup + steps + 1
    shutil.copytree(seed_checkpoint, dump / "checkpoint", dirs_exist_ok=True)
    env = _env(ngpu, dump)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ngpu}",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
        "--local-ranks-filter", env["LOG_RANK"], "--role", "rank", "--tee", "3",
        "-m", "torchtitan_ext.train", "--module", "benchmarks.config_registry",
        "--config", variant.config, f"--dump_folder={dump}",
        "--training.steps", str(total), "--profile_step", str(total),
        "--debug.seed", SEED, "--metrics.disable_color_printing",
        "--checkpoint.enable", "--checkpoint.load_only",
        "--metrics.enable_tensorboard", "--metrics.save_tb_folder", "tb",
        "--autoparallel.compile_cache_dir", "autoparallel/compile_cache",
        *variant.args, *extra,
    ]  # fmt: skip
    launched = time.time()
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log = _ANSI.sub("", proc.stdout)
    result = RunResult(variant.key, round_index, proc.returncode, log_tail=log[-3000:])
    step_times: dict[int, float] = {}
    for line in log.splitlines():
        match = _STEP.match(line)
        if not match:
            continue
        rank, step, memory = int(match[1]), int(match[2]), float(match[3])
        result.peak_rss_gib[rank] = max(result.peak_rss_gib.get(rank, 0.0), memory)
        stamp = _timestamp(line)
        if rank == 0 and stamp is not None:
            step_times[step] = stamp
    if 1 in step_times:
        result.start_to_first_step_s = step_times[1] - launched
    result.step_s = [
        step_times[s] - step_times[s - 1]
        for s in range(warmup + 1, warmup + steps + 1)
        if s in step_times and s - 1 in step_times
    ]
    for rank in range(ngpu):
        stats = dump / "rank_stats" / f"rank{rank}.json"
        if stats.exists():
            result.state_bytes[rank] = json.loads(stats.read_text())
    profiled = dump / "step_profile" / "rank0.json"
    if profiled.exists():
        data = json.loads(profiled.read_text())
        result.collectives = data["counts"]
        result.collective_payload_bytes = sum(data["payload_bytes"].values())
        result.kernel_s = data.get("kernel_s", {})
    timed = range(warmup + 1, warmup + steps + 1)
    losses = tensorboard_losses(dump) if proc.returncode == 0 else {}
    result.losses = {step: loss for step, loss in losses.items() if step in timed}
    for name, attr in (("startup.json", "startup"), ("plan.json", "plan")):
        path = dump / "autoparallel" / name
        if variant.autoparallel and path.exists():
            setattr(result, attr, json.loads(path.read_text()))
    return result


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def summarize(results: list[RunResult], *, ngpu: int, rounds: int, steps: int) -> dict[str, dict]:
    """Per variant: medians across the rounds used (exit 0 and all ``steps`` timed), what
    happened to the others, and how its losses compare with the reference variant's."""
    summary: dict[str, dict] = {}
    for variant in VARIANTS:
        mine = [r for r in results if r.variant == variant.key]
        if not mine:
            continue
        used = [r for r in mine if r.returncode == 0 and len(r.step_s) == steps]
        entry = {
            "label": variant.label,
            "rounds_asked": rounds,
            "rounds_run": len(mine),
            "rounds_used": len(used),
            "steps_timed_by_round": [len(r.step_s) for r in mine],
            "unused_rounds": [
                {
                    "round": r.round,
                    "returncode": r.returncode,
                    "steps_timed": len(r.step_s),
                    "log_tail": r.log_tail[-1500:],
                }
                for r in mine
                if r not in used
            ],
        }
        summary[variant.key] = entry
        if not used:
            continue
        step = _median([r.median_step_s for r in used])
        last = used[-1]
        entry |= {
            "step_s": step,
            "step_s_by_round": [r.median_step_s for r in used],
            "tokens_per_s": SUITES[variant.suite].tokens_per_rank_step * ngpu / step,
            "start_to_first_step_s": _median([r.start_to_first_step_s for r in used]),
            "peak_rss_gib_max_rank": _median([max(r.peak_rss_gib.values()) for r in used]),
            "state_bytes_rank0": last.state_bytes.get(0, {}),
            "collectives_per_step": last.collectives,
            "collective_payload_mib_per_step": last.collective_payload_bytes / 2**20,
            "losses": last.losses,
        }
        if all(r.kernel_s for r in used):
            entry["kernel_s_per_step"] = _median([sum(r.kernel_s.values()) for r in used])
        if variant.autoparallel and last.startup:
            phases = {
                k: _median([r.startup["seconds"][k] for r in used]) for k in last.startup["seconds"]
            }
            entry["startup_phases_s"] = phases
            entry["alias_extra_bytes"] = last.startup["alias_extra_bytes"]
            entry["unique_storage_bytes_rank0"] = last.startup["unique_storage_bytes"]
    for key, entry in summary.items():
        reference = SUITES[BY_KEY[key].suite].reference
        entry["reference"] = reference
        entry["losses_vs_reference"] = _loss_agreement(
            [r for r in results if r.variant == key],
            [r for r in results if r.variant == reference and r.losses],
            reference=reference,
            steps=steps,
        )
    return summary


def _loss_agreement(
    runs: list[RunResult], reference_runs: list[RunResult], *, reference: str, steps: int
) -> dict:
    """Whether every run's timed-step losses equal the reference runs' within LOSS_ATOL."""
    if not reference_runs:
        return {"agree": False, "why": f"no losses from the reference variant {reference}"}
    reference_label = BY_KEY[reference].label
    want = reference_runs[0].losses
    if len(want) != steps:
        return {"agree": False, "why": f"the reference logged {len(want)} of {steps} losses"}
    worst = 0.0
    for run in runs:
        if run.returncode != 0:
            continue
        if sorted(run.losses) != sorted(want):
            return {
                "agree": False,
                "why": f"round {run.round + 1} logged steps {sorted(run.losses)}",
            }
        worst = max(worst, *(abs(run.losses[s] - want[s]) for s in want))
    if worst > LOSS_ATOL or worst != worst:
        return {
            "agree": False,
            "max_abs_diff": worst,
            "why": f"losses differ from {reference_label}'s by up to {worst:.3g} "
            f"(> {LOSS_ATOL:g}): it trains something else",
        }
    return {"agree": True, "max_abs_diff": worst}


def ratios(summary: dict[str, dict]) -> dict[str, dict]:
    """Each AutoParallel variant's step time over the fastest of its baselines that ran
    every round and trains the same; or why it gets no ratio."""
    out: dict[str, dict] = {}
    for variant in VARIANTS:
        e = summary.get(variant.key)
        if not variant.baselines or e is None:
            continue
        why = _not_comparable(e)
        candidates = [
            (summary[b]["step_s"], b)
            for b in variant.baselines
            if b in summary and not _not_comparable(summary[b])
        ]
        if not why and not candidates:
            why = f"no baseline of {list(variant.baselines)} ran every round and trains the same"
        if why:
            out[variant.key] = {"baseline": None, "step_s_ratio": None, "why": why}
            continue
        best_step, best = min(candidates)
        out[variant.key] = {
            "baseline": best,
            "step_s_ratio": e["step_s"] / best_step,
            "peak_rss_ratio": e["peak_rss_gib_max_rank"] / summary[best]["peak_rss_gib_max_rank"],
        }
        kernels = [x["kernel_s_per_step"] for x in (e, summary[best]) if "kernel_s_per_step" in x]
        if len(kernels) == 2:
            # A dense model's plans all run the same matmul and attention calls; if nothing
            # else took time and they ran as fast as in the faster of the two runs, the
            # ratio would be this. An MoE plan moves expert work between ranks: indicative.
            out[variant.key]["floor_ratio"] = min(kernels) / best_step
    return out


def _not_comparable(entry: dict) -> str:
    """Why a variant's figures cannot enter a ratio, or empty."""
    if entry["rounds_used"] < entry["rounds_asked"]:
        return f"{entry['rounds_used']} of {entry['rounds_asked']} rounds used"
    if not entry["losses_vs_reference"]["agree"]:
        return entry["losses_vs_reference"]["why"]
    return ""


# Warm starts: each AutoParallel variant against torchtitan's own start of the same model
# (eager with eager, compiled with compiled).
WARM_BASELINES = {
    "ap_fsdp": "titan_fsdp",
    "ap_fsdp_compiled": "titan_fsdp_compiled",
    "ap_moe_ep": "titan_moe_ep",
    "ap_moe_ep_compiled": "titan_moe_ep_compiled",
}


def warm_starts(
    *,
    ngpu: int,
    dump_root: Path,
    keys: list[str],
    seed_checkpoints: dict[str, Path],
    rounds: int = 3,
) -> dict[str, dict]:
    """Start-to-first-step of a cold start, then of ``rounds`` interleaved warm starts
    reusing the cold start's dump folder (placement file, graph cache, compile caches);
    medians. torchtitan's variants get the same treatment (their warm start reuses only the
    compile caches): they are the baselines. A variant gets a ratio only if every start's
    timed-step loss (after one step of training) equals its baseline's cold start's within
    LOSS_ATOL."""
    extra = ("--autoparallel.placement_file", "placements.json")
    # key -> its cold start, then its warm starts.
    runs: dict[str, list[RunResult]] = {key: [] for key in keys}

    def start(key: str, attempt: int) -> None:
        variant = BY_KEY[key]
        result = run_variant(
            variant, round_index=attempt, ngpu=ngpu, warmup=1, steps=1,
            dump=dump_root / f"warm-{key}", seed_checkpoint=seed_checkpoints[variant.suite],
            extra=extra if variant.autoparallel else (),
        )  # fmt: skip
        runs[key].append(result)
        print(f"start {attempt} {key}: {_start_s(result):.1f} s", flush=True)

    for key in keys:
        shutil.rmtree(dump_root / f"warm-{key}", ignore_errors=True)
        start(key, 0)
    for round_index in range(rounds):
        for key in keys[round_index % len(keys) :] + keys[: round_index % len(keys)]:
            start(key, round_index + 1)
    starts: dict[str, dict] = {}
    for key in keys:
        cold, *warm = runs[key]
        warm_s = [_start_s(r) for r in warm]
        starts[key] = {
            "label": BY_KEY[key].label,
            "cold_s": _start_s(cold),
            "cold_phases_s": cold.startup.get("seconds", {}),
            "warm_s": _median(warm_s),
            "warm_rounds_s": warm_s,
            # Where the warm start's time goes: AutoParallel's phases, the rest is launch,
            # model build, compilation (at step 1) and step 1 itself.
            "warm_phases_s": warm[-1].startup.get("seconds", {}) if warm else {},
        }
    for key in keys:
        baseline = WARM_BASELINES.get(key)
        if baseline in starts:
            agreement = _loss_agreement(runs[key], runs[baseline][:1], reference=baseline, steps=1)
            starts[key]["vs"] = {"baseline": baseline, "losses": agreement}
            if agreement["agree"]:
                starts[key]["vs"]["warm_s_ratio"] = (
                    starts[key]["warm_s"] / starts[baseline]["warm_s"]
                )
    return starts


def _start_s(result: RunResult) -> float:
    return result.start_to_first_step_s if result.returncode == 0 else float("nan")


def _markdown(report: dict) -> str:
    s = report["summary"]
    lines = [
        f"Measured {report['date']} on {report['machine']}, {report['ngpu']} ranks "
        f"({report['backend']}), "
        + (
            f"{report['rounds']} interleaved rounds of {report['warmup']} warm-up + "
            f"{report['steps']} timed steps; medians."
            if report["rounds"]
            else "warm starts only."
        ),
    ]
    if report["rounds"]:
        lines += [
            "",
            "Losses of every run are compared with its model's reference ("
            + ", ".join(BY_KEY[suite.reference].label for suite in SUITES.values())
            + f") over the timed steps (within {LOSS_ATOL:g}); each ratio is against the "
            "fastest baseline that trains the same and ran every round. Kernels: the seconds "
            "of matmul and attention kernels in one profiled step after the timed ones (rank "
            "0, CPU); a ratio's floor is what it would be if nothing else took time (the "
            "faster run's kernels over the baseline's step): no plan of a dense model gets "
            "below it (MoE plans move expert work between ranks: there it is indicative).",
            "",
            "| variant | s/step | tokens/s | rounds used / run | losses vs reference "
            "| vs best baseline | kernels (s/step) | start to step 1 (s) | peak RSS/rank (GiB) "
            "| params+grads+optimizer/rank (MiB) | collectives/step |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for variant in VARIANTS:
        e = s.get(variant.key)
        if e is None:
            continue
        rounds = f"{e['rounds_used']} / {e['rounds_run']}"
        agreement = e["losses_vs_reference"]
        losses = f"agree (max {agreement['max_abs_diff']:.1g})" if agreement["agree"] else "differ"
        if "step_s" not in e:
            lines.append(f"| {variant.label} | failed | | {rounds} | | | | | | | |")
            continue
        r = report.get("ratios", {}).get(variant.key)
        if r is None:
            ratio = ""
        elif r["baseline"] is None:
            ratio = f"no ratio: {r['why']}"
        else:
            ratio = f"{r['step_s_ratio']:.2f}x {s[r['baseline']]['label']}"
            if "floor_ratio" in r:
                ratio += f" (floor {r['floor_ratio']:.2f}x)"
        state = sum(e["state_bytes_rank0"].values()) / 2**20 if e["state_bytes_rank0"] else 0
        coll = ", ".join(f"{n} {k}" for k, n in sorted(e["collectives_per_step"].items()))
        kernels = f"{e['kernel_s_per_step']:.3f}" if "kernel_s_per_step" in e else ""
        lines.append(
            f"| {variant.label} | {e['step_s']:.3f} | {e['tokens_per_s']:,.0f} | {rounds} "
            f"| {losses} | {ratio} | {kernels} | {e['start_to_first_step_s']:.1f} "
            f"| {e['peak_rss_gib_max_rank']:.2f} | {state:.1f} | {coll} |"
        )
    unused = [(v, u) for v in VARIANTS for u in s.get(v.key, {}).get("unused_rounds", [])]
    if unused:
        lines += ["", "Rounds not used:", ""]
        lines += [
            f"- {v.label}, round {u['round'] + 1}: exit {u['returncode']}, "
            f"{u['steps_timed']} steps timed"
            for v, u in unused
        ]
    phases = [(v, s[v.key]) for v in VARIANTS if "startup_phases_s" in s.get(v.key, {})]
    if phases:
        lines += ["", "AutoParallel start-up phases (s, rank 0):", ""]
        names = list(phases[0][1]["startup_phases_s"])
        lines.append("| variant | " + " | ".join(names) + " | alias share | alias extra bytes |")
        lines.append("|---|" + "---|" * (len(names) + 2))
        for variant, e in phases:
            p = e["startup_phases_s"]
            alias = p["alias_capture"] + p["alias_restore"] + p["alias_verify"]
            share = alias / (p["trace"] + p["solve"] + p["apply"] + p.get("graph_cache_load", 0))
            cells = " | ".join(f"{p[n]:.3f}" for n in names)
            lines.append(f"| {variant.label} | {cells} | {share:.2%} | {e['alias_extra_bytes']} |")
    if report.get("warm_starts"):
        lines += [
            "",
            "Warm starts reuse their cold start's dump folder; a ratio only where every "
            "start's loss after one step equals its baseline's cold start's (within "
            f"{LOSS_ATOL:g}).",
            "",
            "| start to step 1 | cold (s) | warm, median (s) | warm rounds (s) "
            "| warm / torchtitan's warm "
            "| warm: trace / solve / apply / graph cache load / init (s) | warm: rest (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        names = ("trace", "solve", "apply", "graph_cache_load", "init")
        for w in report["warm_starts"].values():
            p = w.get("warm_phases_s") or {}
            split = " / ".join(f"{p.get(n, 0.0):.1f}" for n in names)
            rest = w["warm_s"] - sum(p.get(n, 0.0) for n in names)
            rounds = ", ".join(f"{t:.1f}" for t in w.get("warm_rounds_s", [w["warm_s"]]))
            vs = w.get("vs")
            ratio = ""
            if vs and "warm_s_ratio" in vs:
                ratio = f"{vs['warm_s_ratio']:.2f}x {BY_KEY[vs['baseline']].label}"
            elif vs:
                ratio = f"no ratio: {vs['losses']['why']}"
            lines.append(
                f"| {w['label']} | {w['cold_s']:.1f} | {w['warm_s']:.1f} | {rounds} | {ratio} "
                f"| {split if p else ''} | {rest:.1f} |"
            )
    if report.get("scaling"):
        lines += ["", "Parallelize time vs model and mesh size (fake process group):", ""]
        lines.append("| layers | mesh | trace (s) | solve (s) | apply (s) | total (s) |")
        lines.append("|---|---|---|---|---|---|")
        for p in report["scaling"]:
            lines.append(
                f"| {p['layers']} | {p['mesh']} | {p['trace']:.1f} | {p['solve']:.1f} "
                f"| {p['apply']:.1f} | {p['trace'] + p['solve'] + p['apply']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def _chart(report: dict, path: Path) -> str:
    """Draw the time-breakdown chart; returns what was written, or how to get it."""
    try:
        import matplotlib
    except ImportError:
        return f"no chart: matplotlib is not installed (pip install -e '.[bench]' draws {path})"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(e["label"], e) for e in report["summary"].values() if "start_to_first_step_s" in e]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [label for label, _ in rows]
    # AutoParallel's Inductor compile runs at apply; torchtitan's, at step 1 (in "rest").
    phase_names = ["trace", "solve", "apply", "compile", "init"]
    bottom = [0.0] * len(rows)
    for name in phase_names:
        values = [e.get("startup_phases_s", {}).get(name, 0.0) for _, e in rows]
        left.barh(labels, values, left=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    other = [
        max(e["start_to_first_step_s"] - b, 0.0) for (_, e), b in zip(rows, bottom, strict=True)
    ]
    left.barh(labels, other, left=bottom, label="rest (launch, build, step 1; torchtitan: compile)")
    left.set_xlabel("seconds from launch to step 1")
    left.legend(fontsize=7)
    left.invert_yaxis()
    right.barh(labels, [e["step_s"] for _, e in rows], color="gray")
    right.set_xlabel("median s/step")
    right.set_yticks([])
    right.invert_yaxis()
    fig.suptitle(f"{report['machine']}, {report['ngpu']} ranks, {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="timed steps (>= 10)")
    parser.add_argument("--ngpu", type=int, default=2)
    parser.add_argument("--variants", default=",".join(v.key for v in VARIANTS))
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the runs' dump folders (default: a new temporary folder)",
    )
    parser.add_argument(
        "--name", default="latest", help="results file stem: <output>/<name>.json, .md, .png"
    )
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-start runs")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    args = parser.parse_args(argv)
    keys = args.variants.split(",")
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(BY_KEY)}")
    try:
        import autoparallel  # noqa: F401
    except ImportError:
        dropped = [k for k in keys if BY_KEY[k].autoparallel]
        keys = [k for k in keys if not BY_KEY[k].autoparallel]
        print(
            f"AutoParallel is not installed: skipping {dropped} (pip install -e '.[autoparallel]')"
        )

    if args.work is None:
        # A new folder (mode 0700) per benchmark: a fixed one would feed an earlier or
        # another user's placement files and graph caches to these runs.
        args.work = Path(tempfile.mkdtemp(prefix="torchtitan_ext_bench."))
    print(f"work folder: {args.work}", flush=True)

    results: list[RunResult] = []
    seed_checkpoints = {
        name: make_seed_checkpoint(args.work, suite)
        for name, suite in SUITES.items()
        if (args.rounds or not args.no_warm) and any(BY_KEY[k].suite == name for k in keys)
    }
    for round_index in range(args.rounds):
        order = keys[round_index % len(keys) :] + keys[: round_index % len(keys)]
        for key in order:
            dump = args.work / f"round{round_index}-{key}"
            if dump.exists():  # from an earlier benchmark in this --work: start clean
                shutil.rmtree(dump)
            t0 = time.time()
            result = run_variant(
                BY_KEY[key], round_index=round_index, ngpu=args.ngpu,
                warmup=args.warmup, steps=args.steps, dump=dump,
                seed_checkpoint=seed_checkpoints[BY_KEY[key].suite],
            )  # fmt: skip
            results.append(result)
            status = "ok" if result.returncode == 0 else f"FAILED ({result.returncode})"
            print(
                f"round {round_index + 1}/{args.rounds} {key}: {status}, "
                f"{result.median_step_s:.3f} s/step, {time.time() - t0:.0f} s",
                flush=True,
            )

    accelerator = torch.accelerator.is_available()
    report = {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": (
            f"{platform.machine()} {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
            + (f", {torch.accelerator.device_count()} accelerators" if accelerator else ", no GPU")
        ),
        "backend": "nccl" if accelerator else "gloo",
        "ngpu": args.ngpu,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "steps": args.steps,
        "summary": summarize(results, ngpu=args.ngpu, rounds=args.rounds, steps=args.steps),
        "runs": [asdict(r) | {"log_tail": r.log_tail[-500:]} for r in results],
    }
    report["ratios"] = ratios(report["summary"])
    # Each AutoParallel variant after its torchtitan baseline, in WARM_BASELINES' order.
    warm_keys = [k for pair in WARM_BASELINES.items() for k in reversed(pair) if k in keys]
    if not args.no_warm and warm_keys:
        report["warm_starts"] = warm_starts(
            ngpu=args.ngpu, dump_root=args.work, keys=warm_keys, seed_checkpoints=seed_checkpoints,
        )  # fmt: skip
    if not args.no_scaling and any(BY_KEY[k].autoparallel for k in keys):
        from benchmarks.scaling import scaling_table

        report["scaling"] = scaling_table()

    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{args.name}.json").write_text(json.dumps(report, indent=2, default=str))
    (args.output / f"{args.name}.md").write_text(_markdown(report))
    chart = _chart(report, args.output / f"{args.name}.png")
    print(_markdown(report))
    print(chart)
    print("Ratios (ours / the fastest baseline that trains the same), lower is better:")
    for key, r in report["ratios"].items():
        label = BY_KEY[key].label
        if r["baseline"] is None:
            print(f"  {label}: no ratio ({r['why']})")
        else:
            floor = f" (floor {r['floor_ratio']:.2f})" if "floor_ratio" in r else ""
            print(
                f"  {label} / {BY_KEY[r['baseline']].label}: step time "
                f"{r['step_s_ratio']:.2f}{floor}, peak RSS {r['peak_rss_ratio']:.2f}"
            )
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
