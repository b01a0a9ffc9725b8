"""What AutoParallel and alias handling cost, against torchtitan's and torch's own
parallelization, in one command:

    python -m benchmarks.run                      # every variant, 3 interleaved rounds
    python -m benchmarks.run --rounds 1 --variants titan_fsdp,ap_fsdp --no-scaling

Every variant trains the same model (torchtitan's llama3 debug model, tied embeddings),
same data, shapes, dtype and seed, on --ngpu ranks (gloo on CPU). Rounds interleave the
variants (rotating their order), so machine noise hits all of them; medians are taken
within a run (steps) and across rounds. Writes <output>/latest.json, latest.md and
latest.png (time breakdown) and prints the ratios against the baselines last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TIME = re.compile(r"\[titan\] (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
_STEP = re.compile(r"^\[rank(\d+)\]:.*step:\s*(\d+)\s+loss:.*memory:\s*([\d.]+)GiB")


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    config: str
    args: tuple[str, ...] = ()
    baseline: str = ""
    """Key of the variant this one is compared to."""
    autoparallel: bool = False


_COMPILE = ("--compile.enable",)
_REPLICATE = (
    "--parallelism.data_parallel_replicate_degree", "2",
    "--parallelism.data_parallel_shard_degree", "1",
)  # fmt: skip
_TITAN = ("--parallelize", "torchtitan")
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
        baseline="titan_fsdp", autoparallel=True,
    ),
    Variant(
        "ap_fsdp_compiled", "AutoParallel FSDP-like compiled", "llama3_debugmodel_bench",
        _COMPILE, baseline="titan_fsdp", autoparallel=True,
    ),
    Variant(
        "ap_ddp", "AutoParallel DDP-like", "llama3_debugmodel_bench", _REPLICATE,
        baseline="torch_ddp", autoparallel=True,
    ),
    Variant(
        "ap_ddp_compiled", "AutoParallel DDP-like compiled", "llama3_debugmodel_bench",
        _REPLICATE + _COMPILE, baseline="torch_ddp", autoparallel=True,
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
    startup: dict = field(default_factory=dict)
    """AutoParallel runs: the component's start-up phases (startup.json)."""
    plan: dict = field(default_factory=dict)
    log_tail: str = ""

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s) if self.step_s else float("nan")


def _timestamp(line: str) -> float | None:
    match = _TIME.search(line)
    if match is None:
        return None
    return datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def run_variant(
    variant: Variant,
    *,
    round_index: int,
    ngpu: int,
    warmup: int,
    steps: int,
    dump: Path,
    extra: tuple[str, ...] = (),
) -> RunResult:
    """Train ``variant`` for warmup + steps timed steps + 1 profiled step."""
    total = warmup + steps + 1
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "LOG_RANK": ",".join(str(r) for r in range(ngpu)),
        # Cold compile caches unless a warm start reuses this dump folder on purpose.
        "TORCHINDUCTOR_CACHE_DIR": str(dump / "autoparallel" / "compile_cache"),
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ngpu}",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
        "--local-ranks-filter", env["LOG_RANK"], "--role", "rank", "--tee", "3",
        "-m", "torchtitan_ext.train", "--module", "benchmarks.config_registry",
        "--config", variant.config, f"--dump_folder={dump}",
        "--training.steps", str(total), "--profile_step", str(total),
        "--debug.seed", "42", "--metrics.disable_color_printing",
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
    collectives = dump / "collectives" / "rank0.json"
    if collectives.exists():
        data = json.loads(collectives.read_text())
        result.collectives = data["counts"]
        result.collective_payload_bytes = sum(data["payload_bytes"].values())
    for name, attr in (("startup.json", "startup"), ("plan.json", "plan")):
        path = dump / "autoparallel" / name
        if variant.autoparallel and path.exists():
            setattr(result, attr, json.loads(path.read_text()))
    return result


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def summarize(results: list[RunResult], *, tokens_per_step: int) -> dict[str, dict]:
    """Per variant: medians across rounds."""
    summary: dict[str, dict] = {}
    for variant in VARIANTS:
        runs = [r for r in results if r.variant == variant.key and r.returncode == 0]
        failed = [r for r in results if r.variant == variant.key and r.returncode != 0]
        if not runs:
            if failed:
                summary[variant.key] = {"label": variant.label, "failed": failed[0].log_tail}
            continue
        step = _median([r.median_step_s for r in runs])
        last = runs[-1]
        entry = {
            "label": variant.label,
            "rounds": len(runs),
            "step_s": step,
            "step_s_by_round": [r.median_step_s for r in runs],
            "tokens_per_s": tokens_per_step / step,
            "start_to_first_step_s": _median([r.start_to_first_step_s for r in runs]),
            "peak_rss_gib_max_rank": _median([max(r.peak_rss_gib.values()) for r in runs]),
            "state_bytes_rank0": last.state_bytes.get(0, {}),
            "collectives_per_step": last.collectives,
            "collective_payload_mib_per_step": last.collective_payload_bytes / 2**20,
        }
        if variant.autoparallel and last.startup:
            phases = {
                k: _median([r.startup["seconds"][k] for r in runs]) for k in last.startup["seconds"]
            }
            entry["startup_phases_s"] = phases
            entry["alias_extra_bytes"] = last.startup["alias_extra_bytes"]
            entry["unique_storage_bytes_rank0"] = last.startup["unique_storage_bytes"]
        summary[variant.key] = entry
    return summary


def warm_starts(*, ngpu: int, dump_root: Path, keys: list[str]) -> dict[str, dict]:
    """Start-to-first-step of a cold start and of a second start reusing the first one's
    placement file and compile caches (same dump folder)."""
    starts = {}
    for key in keys:
        variant = BY_KEY[key]
        dump = dump_root / f"warm-{key}"
        extra = ("--autoparallel.placement_file", "placements.json")
        times, phases = [], []
        for attempt in range(2):
            result = run_variant(
                variant, round_index=attempt, ngpu=ngpu, warmup=1, steps=1, dump=dump, extra=extra
            )
            times.append(result.start_to_first_step_s if result.returncode == 0 else float("nan"))
            phases.append(result.startup.get("seconds", {}))
        starts[key] = {
            "label": variant.label,
            "cold_s": times[0],
            "warm_s": times[1],
            # Where the warm start's time goes: AutoParallel's phases, the rest is launch,
            # model build, compilation (at step 1) and step 1 itself.
            "cold_phases_s": phases[0],
            "warm_phases_s": phases[1],
        }
    return starts


def _markdown(report: dict) -> str:
    s = report["summary"]
    lines = [
        f"Measured {report['date']} on {report['machine']}, {report['ngpu']} ranks "
        f"({report['backend']}), {report['rounds']} interleaved rounds of "
        f"{report['warmup']} warm-up + {report['steps']} timed steps; medians.",
        "",
        "| variant | s/step | tokens/s | vs baseline | start to step 1 (s) | peak RSS/rank (GiB) "
        "| params+grads+optimizer/rank (MiB) | collectives/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        e = s.get(variant.key)
        if e is None:
            continue
        if "failed" in e:
            lines.append(f"| {variant.label} | failed | | | | | | |")
            continue
        base = s.get(variant.baseline, {})
        ratio = f"{e['step_s'] / base['step_s']:.2f}x {base['label']}" if "step_s" in base else ""
        state = sum(e["state_bytes_rank0"].values()) / 2**20 if e["state_bytes_rank0"] else 0
        coll = ", ".join(f"{n} {k}" for k, n in sorted(e["collectives_per_step"].items()))
        lines.append(
            f"| {variant.label} | {e['step_s']:.3f} | {e['tokens_per_s']:,.0f} | {ratio} "
            f"| {e['start_to_first_step_s']:.1f} | {e['peak_rss_gib_max_rank']:.2f} "
            f"| {state:.1f} | {coll} |"
        )
    phases = [(v, s[v.key]) for v in VARIANTS if "startup_phases_s" in s.get(v.key, {})]
    if phases:
        lines += ["", "AutoParallel start-up phases (s, rank 0):", ""]
        names = list(phases[0][1]["startup_phases_s"])
        lines.append("| variant | " + " | ".join(names) + " | alias share | alias extra bytes |")
        lines.append("|---|" + "---|" * (len(names) + 2))
        for variant, e in phases:
            p = e["startup_phases_s"]
            alias = p["alias_capture"] + p["alias_restore"] + p["alias_verify"]
            share = alias / (p["trace"] + p["solve"] + p["apply"])
            cells = " | ".join(f"{p[n]:.3f}" for n in names)
            lines.append(f"| {variant.label} | {cells} | {share:.2%} | {e['alias_extra_bytes']} |")
    if report.get("warm_starts"):
        lines += [
            "",
            "| start to step 1 | cold (s) | warm: placement file + caches (s) "
            "| warm: trace / solve / apply / init (s) | warm: rest (s) |",
            "|---|---|---|---|---|",
        ]
        for w in report["warm_starts"].values():
            p = w.get("warm_phases_s") or {}
            split = " / ".join(f"{p.get(n, 0.0):.1f}" for n in ("trace", "solve", "apply", "init"))
            rest = w["warm_s"] - sum(p.values())
            lines.append(
                f"| {w['label']} | {w['cold_s']:.1f} | {w['warm_s']:.1f} "
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


def _chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(e["label"], e) for e in report["summary"].values() if "start_to_first_step_s" in e]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [label for label, _ in rows]
    phase_names = ["trace", "solve", "apply", "init"]
    bottom = [0.0] * len(rows)
    for name in phase_names:
        values = [e.get("startup_phases_s", {}).get(name, 0.0) for _, e in rows]
        left.barh(labels, values, left=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    other = [
        max(e["start_to_first_step_s"] - b, 0.0) for (_, e), b in zip(rows, bottom, strict=True)
    ]
    left.barh(labels, other, left=bottom, label="rest (launch, build, compile, step 1)")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="timed steps (>= 10)")
    parser.add_argument("--ngpu", type=int, default=2)
    parser.add_argument("--variants", default=",".join(v.key for v in VARIANTS))
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/torchtitan_ext_bench"))
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

    results: list[RunResult] = []
    for round_index in range(args.rounds):
        order = keys[round_index % len(keys) :] + keys[: round_index % len(keys)]
        for key in order:
            dump = args.work / f"round{round_index}-{key}"
            t0 = time.time()
            result = run_variant(
                BY_KEY[key], round_index=round_index, ngpu=args.ngpu,
                warmup=args.warmup, steps=args.steps, dump=dump,
            )  # fmt: skip
            results.append(result)
            status = "ok" if result.returncode == 0 else f"FAILED ({result.returncode})"
            print(
                f"round {round_index + 1}/{args.rounds} {key}: {status}, "
                f"{result.median_step_s:.3f} s/step, {time.time() - t0:.0f} s",
                flush=True,
            )

    tokens_per_step = 8 * args.ngpu * 256  # local batch 8 x dp ranks x seq_len 256
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
        "summary": summarize(results, tokens_per_step=tokens_per_step),
        "runs": [asdict(r) | {"log_tail": r.log_tail[-500:]} for r in results],
    }
    if not args.no_warm:
        warm_keys = [k for k in ("titan_fsdp_compiled", "ap_fsdp", "ap_fsdp_compiled") if k in keys]
        report["warm_starts"] = warm_starts(ngpu=args.ngpu, dump_root=args.work, keys=warm_keys)
    if not args.no_scaling and any(BY_KEY[k].autoparallel for k in keys):
        from benchmarks.scaling import scaling_table

        report["scaling"] = scaling_table()

    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "latest.json").write_text(json.dumps(report, indent=2, default=str))
    (args.output / "latest.md").write_text(_markdown(report))
    _chart(report, args.output / "latest.png")
    print(_markdown(report))
    print("Ratios (ours / baseline), lower is better:")
    for key in keys:
        e, variant = report["summary"].get(key, {}), BY_KEY[key]
        base = report["summary"].get(variant.baseline, {})
        if "step_s" in e and "step_s" in base:
            step = e["step_s"] / base["step_s"]
            rss = e["peak_rss_gib_max_rank"] / base["peak_rss_gib_max_rank"]
            print(f"  {variant.label} / {base['label']}: step time {step:.2f}, peak RSS {rss:.2f}")
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
