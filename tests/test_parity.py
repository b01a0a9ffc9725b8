"""Parity with eager: the same model, weights, seed and data trained (a) eagerly on one
rank (the same config through torchtitan's own parallelize, ``--parallelize torchtitan``)
and (b) through AliasAwareAutoParallel on 2 ranks, both from one seed checkpoint,
deterministic, float32 on CPU, 20 steps of 8 x 128 tokens, gradient clipping off.

The dataloader makes a 1-rank run with local batch 8 and a 2-rank run with local batch 4
see the same global batches (GlobalBatchTextDataLoader), so the runs may differ only by
floating-point reduction order. Compared (``parity_problems``): the loss and the gradient
norm of every step, read at full precision from TensorBoard (as torchtitan's
scripts/loss_compare.py reads losses), and every step-1 gradient as the backward left it,
before clipping, under every name (alias names included; ``--grad_dump_step 1``).

Clipping is off (``--training.max_norm 1e9``: the clip coefficient clamps to 1) and the
gradients are read before it, because clipping at 1.0 would hide a uniform gradient
scaling fault whenever the norm exceeds 1, and AdamW then hides it from the losses. The
last tests inject such faults into the AutoParallel run (tests/support/faults/sitecustomize.py)
and require the same checks to fail.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.support.training import fault_env, run_train, tensorboard_scalars

pytestmark = [pytest.mark.slow, pytest.mark.engine]

# variant -> (config, extra flags of the AutoParallel run). The shared-RoPE run is compiled
# (Inductor with bucketing, our compiler), so it also checks compiled numerics against eager.
VARIANTS = {
    "tied": ("llama3_debugmodel_autoparallel", ()),
    "shared_rope_compiled": ("llama3_debugmodel_shared_rope_autoparallel", ("--compile.enable",)),
}
STEPS = 20
# Half the configs' 256 tokens: the same parity, 45 s less CI time for the two variants.
SEQ_LEN = 128
RTOL, ATOL = 1e-4, 1e-5
SEED = "42"
NO_CLIPPING = ("--training.max_norm", "1e9")
TB_TAGS = {"loss": "loss_metrics/global_avg_loss", "grad_norm": "grad_norm"}
# The step the runs profile while it runs (not step 1, which compiles).
COUNTED_STEP = 2


@dataclass
class Trained:
    log: str
    seconds: float
    losses: dict[int, float]
    grad_norms: dict[int, float]
    """step -> value, full precision, from TensorBoard."""
    grads: dict[str, torch.Tensor | None]
    """FQN (every name, aliases included) -> full step-1 gradient before clipping."""
    collectives: dict[str, int]
    """Collectives of step COUNTED_STEP on rank 0, counted while it ran."""
    kernel_s: dict[str, float]
    """Seconds of step COUNTED_STEP's matmul and attention kernels on rank 0."""


def _tensorboard(dump_folder: Path) -> dict[str, dict[int, float]]:
    runs = [p for p in (dump_folder / "tb").iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one TensorBoard run under {dump_folder / 'tb'}: {runs}"
    return tensorboard_scalars(runs[0], TB_TAGS)


_SEEDS: dict[str, Path] = {}


def seed_checkpoint_of(config: str, root: Path) -> Path:
    """torchtitan's seed checkpoint (step-0) of ``config``, seed 42, made once per session
    (test_pipeline shares it) under ``root``."""
    if config not in _SEEDS:
        run_train(
            config,
            "--checkpoint.create_seed_checkpoint",
            "--checkpoint.enable",
            "--debug.seed", SEED,
            ngpu=1,
            dump_folder=root,
        ).check()  # fmt: skip
        assert (root / "checkpoint" / "step-0" / ".metadata").is_file()
        _SEEDS[config] = root / "checkpoint"
    return _SEEDS[config]


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory) -> Path:
    """The debug model's seed checkpoint: both variants have the same parameters and
    state_dict keys (the shared RoPE cache is a non-persistent buffer), and a key mismatch
    would fail DCP's load."""
    return seed_checkpoint_of(VARIANTS["tied"][0], tmp_path_factory.mktemp("seed"))


def _train(
    config: str,
    seed_checkpoint: Path,
    dump: Path,
    *args: str,
    ngpu: int,
    steps: int = STEPS,
    env: dict[str, str] | None = None,
    model: str = "llama3",
) -> Trained:
    shutil.copytree(seed_checkpoint, dump / "checkpoint")
    start = time.perf_counter()
    run = run_train(
        config,
        "--training.steps", str(steps),
        "--training.seq_len", str(SEQ_LEN),
        *NO_CLIPPING,
        "--checkpoint.enable", "--checkpoint.load_only",
        "--debug.seed", SEED, "--debug.deterministic",
        "--metrics.enable_tensorboard", "--metrics.save_tb_folder", "tb",
        "--grad_dump_step", "1",
        "--profile_step", str(COUNTED_STEP),
        *args,
        ngpu=ngpu,
        dump_folder=dump,
        env=env,
        model=model,
    ).check()  # fmt: skip
    assert f"Loading the checkpoint from {dump}/checkpoint/step-0." in run.log
    seconds = time.perf_counter() - start
    scalars = _tensorboard(dump)
    profiled = json.loads((dump / "step_profile" / "rank0.json").read_text())
    return Trained(
        log=run.log,
        seconds=seconds,
        losses=scalars["loss"],
        grad_norms=scalars["grad_norm"],
        grads=torch.load(dump / "grads" / "step-1.pt"),
        collectives=profiled["counts"],
        kernel_s=profiled.get("kernel_s", {}),
    )


def _close(got: float, want: float) -> bool:
    return math.isfinite(got) and abs(got - want) <= ATOL + RTOL * abs(want)


def parity_problems(eager: Trained, ap: Trained) -> dict[str, list[str]]:
    """What differs between the runs beyond floating-point reduction order, by kind; the
    AutoParallel run may have run fewer steps than eager (its steps are compared)."""
    problems: dict[str, list[str]] = {"losses": [], "grad_norms": [], "gradients": []}
    for kind, values, reference in (
        ("losses", ap.losses, eager.losses),
        ("grad_norms", ap.grad_norms, eager.grad_norms),
    ):
        if not values or not set(values) <= set(reference):
            problems[kind].append(f"steps {sorted(values)} not within eager's {sorted(reference)}")
            continue
        problems[kind] += [
            f"step {step}: AutoParallel {values[step]!r} vs eager {reference[step]!r}"
            for step in sorted(values)
            if not _close(values[step], reference[step])
        ]
    grads = problems["gradients"]
    missing, extra = (
        sorted(set(eager.grads) - set(ap.grads)),
        sorted(set(ap.grads) - set(eager.grads)),
    )
    if missing:
        grads.append(f"names without an AutoParallel gradient: {', '.join(missing)}")
    if extra:
        grads.append(f"names eager does not have: {', '.join(extra)}")
    for fqn in sorted(set(eager.grads) & set(ap.grads)):
        want, got = eager.grads[fqn], ap.grads[fqn]
        if want is None or got is None:
            if (want is None) != (got is None):
                grads.append(f"{fqn}: gradient {got is not None} vs eager {want is not None}")
            continue
        if got.shape != want.shape:
            grads.append(f"{fqn}: shape {tuple(got.shape)} vs eager {tuple(want.shape)}")
        elif not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
            grads.append(f"{fqn}: max |difference| {(got - want).abs().max().item():.3g}")
    return problems


_EAGER: dict[str, Trained] = {}


def eager_run(config: str, seed_checkpoint: Path, root: Path) -> Trained:
    """``config`` trained eagerly on 1 rank (torchtitan's parallelize), local batch 8, once
    per session (test_pipeline compares its runs with the same ones)."""
    if config not in _EAGER:
        eager = _train(
            config, seed_checkpoint, root,
            "--parallelize", "torchtitan", "--training.local_batch_size", "8", ngpu=1,
        )  # fmt: skip
        assert "AutoParallel: planning" not in eager.log
        assert "global batch size 8," in eager.log
        _EAGER[config] = eager
    return _EAGER[config]


_PARITY: dict[str, tuple[Trained, Trained]] = {}


def _parity(variant: str, seed_checkpoint: Path, root: Path) -> tuple[Trained, Trained]:
    """Train ``variant`` eagerly (1 rank) and through AutoParallel (2 ranks), once."""
    if variant in _PARITY:
        return _PARITY[variant]
    config, ap_args = VARIANTS[variant]
    eager = eager_run(config, seed_checkpoint, root / "eager")
    ap = _train(
        config,
        seed_checkpoint,
        root / "autoparallel",
        "--training.local_batch_size", "4",
        *ap_args,
        ngpu=2,
    )  # fmt: skip
    # (a) really is eager and (b) really is AutoParallel on a 2-rank sharded mesh.
    assert f"AutoParallel: planning on mesh {{'dp_shard': 2}}, global batch 8 x {SEQ_LEN}" in ap.log
    assert "global batch size 8," in ap.log
    assert "parameter tok_embeddings.weight = lm_head.weight" in ap.log
    if "shared_rope" in config:
        assert "buffer layers.0.attention.rope.cache = layers.1.attention.rope.cache" in ap.log
    # Every alias name has its gradient: the tied weight under both names.
    assert {"tok_embeddings.weight", "lm_head.weight"} <= set(eager.grads)
    _PARITY[variant] = (eager, ap)
    return eager, ap


@pytest.fixture(scope="module", params=list(VARIANTS))
def parity(request, seed_checkpoint, tmp_path_factory) -> tuple[Trained, Trained]:
    return _parity(request.param, seed_checkpoint, tmp_path_factory.mktemp(request.param))


def _report(request, record_property, name: str, value) -> None:
    record_property(name, value)
    print(f"{request.node.name}: {name} = {value}")


def test_losses_match_eager(parity, request, record_property):
    eager, ap = parity
    assert sorted(eager.losses) == sorted(ap.losses) == list(range(1, STEPS + 1))
    diffs = {step: abs(ap.losses[step] - eager.losses[step]) for step in eager.losses}
    _report(request, record_property, "max_loss_abs_diff", max(diffs.values()))
    _report(request, record_property, "run_seconds", [round(eager.seconds), round(ap.seconds)])
    assert parity_problems(eager, ap)["losses"] == []


def test_grad_norms_of_every_step_match_eager(parity, request, record_property):
    eager, ap = parity
    assert sorted(ap.grad_norms) == list(range(1, STEPS + 1))
    diffs = [abs(ap.grad_norms[s] - eager.grad_norms[s]) for s in eager.grad_norms]
    _report(request, record_property, "max_grad_norm_abs_diff", max(diffs))
    # Clipping at 1.0 would have acted: the comparison is of unclipped gradients.
    assert eager.grad_norms[1] > 1.0
    assert parity_problems(eager, ap)["grad_norms"] == []


def test_step1_gradients_before_clipping_match_eager(parity, request, record_property):
    eager, ap = parity
    assert len(eager.grads) > 0 and all(g is not None for g in eager.grads.values())
    assert max(g.abs().max().item() for g in eager.grads.values()) > 0
    common = set(eager.grads) & set(ap.grads)
    max_abs = max((ap.grads[f] - eager.grads[f]).abs().max().item() for f in common)
    _report(request, record_property, "max_grad_abs_diff", max_abs)
    assert parity_problems(eager, ap)["gradients"] == []


# The fault, what the AutoParallel run logs when it is injected, and the checks that must
# then fail. AdamW normalizes a uniform gradient scale, so the losses may still agree.
FAULTS = {
    "grad_scale_2x": ("grad_norms", "gradients"),
    "drop_alias": ("gradients",),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_parity_checks_fail_on_an_injected_fault(
    fault, seed_checkpoint, tmp_path_factory, request, record_property
):
    eager, _ = _parity("tied", seed_checkpoint, tmp_path_factory.mktemp("tied"))
    faulty = _train(
        VARIANTS["tied"][0],
        seed_checkpoint,
        tmp_path_factory.mktemp(fault),
        "--training.local_batch_size", "4",
        ngpu=2,
        steps=3,
        env=fault_env(fault),
    )  # fmt: skip
    assert f"[fault-shim] {fault} injected into the AutoParallel model" in faulty.log
    problems = parity_problems(eager, faulty)
    _report(request, record_property, "caught", {k: v[:2] for k, v in problems.items() if v})
    for kind in FAULTS[fault]:
        assert problems[kind], f"{fault} passed the {kind} check: {problems}"
    if fault == "drop_alias":
        assert "names without an AutoParallel gradient: lm_head.weight" in problems["gradients"]


def test_autoparallel_loss_falls(parity):
    losses = [parity[1].losses[s] for s in sorted(parity[1].losses)]
    assert losses[-1] < losses[0] - 3.0, losses


# torchtitan's own all-reduces in each step, outside the model: the global token count,
# the gradient norm, and the logged loss, max loss and tokens seen.
TORCHTITAN_ALL_REDUCES = 5


def plan_collectives(log: str, executed: str) -> dict[str, int]:
    """kind -> count from the plan report's line, e.g. "collectives per step (eager, after
    bucketing): 5 all_gather (41.0 MiB)"; ``executed`` "planned" reads the planned line."""
    label = (
        r"collectives planned \(before bucketing\)"
        if executed == "planned"
        else rf"collectives per step \({re.escape(executed)}\)"
    )
    line = re.search(rf"{label}: (.*)", log)
    assert line, f"no '{executed}' collectives line in the log"
    return {kind: int(n) for n, kind in re.findall(r"(\d+) ([a-z_]+) \(", line[1])}


def test_the_plan_report_names_the_collectives_that_run(parity, request, record_property):
    """The plan report's counts (read from the graphs) are what the step ran, counted by the
    profiler on rank 0 while step COUNTED_STEP ran, plus torchtitan's own all-reduces."""
    _, ap = parity
    compiled = "AutoParallel: compiled plan" in ap.log
    plan = plan_collectives(ap.log, f"{'compiled' if compiled else 'eager'}, after bucketing")
    expected = {**plan, "all_reduce": plan.get("all_reduce", 0) + TORCHTITAN_ALL_REDUCES}
    _report(request, record_property, "collectives_run", ap.collectives)
    assert ap.collectives == expected


def test_the_profiled_step_times_its_matmul_and_attention_kernels(parity, request, record_property):
    """The benchmark's floor (the step time left if only these kernels took time) reads
    these seconds: both kinds are found under the ops' current names, in eager torchtitan
    and in AutoParallel's graphs, and take less than a whole run."""
    for name, trained in zip(("eager", "autoparallel"), parity, strict=True):
        _report(request, record_property, f"kernel_s_{name}", trained.kernel_s)
        assert set(trained.kernel_s) == {"matmul", "attention"}, (name, trained.kernel_s)
        assert all(0 < s < trained.seconds for s in trained.kernel_s.values()), trained.kernel_s


def test_bucketing_runs_at_most_a_fifth_of_the_collectives_of_an_unbucketed_run(
    seed_checkpoint, tmp_path_factory, request, record_property
):
    """Counted by the profiler while a step ran: eager (the tied run, eager_overlap's
    bucketing) and compiled (the shared-RoPE run, Inductor's) against the same plan run
    unbucketed (no eager_overlap, no all-reduce buckets: one collective per parameter and
    redistribution), torchtitan's own included in each. The unbucketed run also runs what
    the plan report counts as planned."""
    _, eager = _parity("tied", seed_checkpoint, tmp_path_factory.mktemp("tied"))
    _, compiled = _parity(
        "shared_rope_compiled", seed_checkpoint, tmp_path_factory.mktemp("shared_rope_compiled")
    )
    unbucketed = _train(
        VARIANTS["tied"][0],
        seed_checkpoint,
        tmp_path_factory.mktemp("unbucketed"),
        "--training.local_batch_size", "4",
        "--autoparallel.no-eager-overlap", "--autoparallel.all_reduce_bucket_mb", "0",
        ngpu=2,
        steps=COUNTED_STEP,
    )  # fmt: skip
    planned = plan_collectives(eager.log, "planned")
    assert planned == plan_collectives(compiled.log, "planned")
    counts = {
        "unbucketed": sum(unbucketed.collectives.values()),
        "eager": sum(eager.collectives.values()),
        "compiled": sum(compiled.collectives.values()),
    }
    _report(request, record_property, "collectives_run_per_step", counts)
    assert counts["unbucketed"] == sum(planned.values()) + TORCHTITAN_ALL_REDUCES, counts
    assert counts["eager"] * 5 <= counts["unbucketed"], counts
    assert counts["compiled"] * 5 <= counts["unbucketed"], counts
