"""Mixture of experts through AutoParallel with expert parallelism, against torchtitan.

One seed checkpoint of the Qwen3 MoE debug config (2 layers, 64 experts, top 8, tied
embeddings), trained 20 steps of 8 x 128 tokens three ways, deterministic, float32 on CPU,
clipping off:

- torchtitan eager on 1 rank (``--parallelize torchtitan``);
- torchtitan's own expert parallelism on 2 ranks (``--parallelize torchtitan
  --parallelism.expert_parallel_degree 2``, DTensor backend): the numerics reference for EP;
- AutoParallel with ``--parallelism.expert_parallel_degree 2`` on 2 ranks, eager and
  compiled (``--compile.enable``).

Compared as in tests/test_parity.py (``parity_problems``): every step's loss and gradient
norm at full precision, every step-1 gradient before clipping under every name; and the
router's load-balancing state after the last step (expert_bias_E, saved by each run's
final DCP checkpoint), which torchtitan's optimizer hook updates from the tokens each
expert received. Measured (2026-12-03): AutoParallel EP against eager, max |d loss| 9.5e-7
over 20 steps, step-1 gradients 2.6e-8, expert_bias_E equal; torchtitan's EP against eager
departs after step 9 (1.4e-3 at step 20).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from tests.support.training import REPO_ROOT, fault_env, run_train
from tests.test_parity import (
    ATOL,
    RTOL,
    SEED,
    STEPS,
    TORCHTITAN_ALL_REDUCES,
    Trained,
    _report,
    _train,
    parity_problems,
    plan_collectives,
)

pytestmark = [pytest.mark.slow, pytest.mark.engine]

CONFIG = "qwen3_moe_debug_autoparallel"
MODEL = "qwen3"
EP = ("--parallelism.expert_parallel_degree", "2")
# Each run saves the model at its last step: the router's buffers are compared from there.
FINAL_SAVE = (
    "--checkpoint.no-load-only",
    "--checkpoint.interval", str(STEPS),
    "--checkpoint.last-save-model-only",
)  # fmt: skip
ROUTER_STATE = ("layers.0.moe.expert_bias_E", "layers.1.moe.expert_bias_E")
# torchtitan's load-balancing hook sums tokens_per_expert_E over the data ranks before the
# optimizer step: one all-reduce more than a dense model's step.
LOAD_BALANCING_ALL_REDUCES = 1


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("moe_seed")
    run_train(
        CONFIG,
        "--checkpoint.create_seed_checkpoint", "--checkpoint.enable",
        "--debug.seed", SEED,
        ngpu=1, dump_folder=dump, model=MODEL,
    ).check()  # fmt: skip
    assert (dump / "checkpoint" / "step-0" / ".metadata").is_file()
    return dump / "checkpoint"


def _router_state(dump: Path, experts: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """The router buffers (FQN -> experts per layer; ROUTER_STATE's by default) as the run's
    final checkpoint holds them."""
    import torch.distributed.checkpoint as dcp

    folder = dump / "checkpoint" / f"step-{STEPS}"
    experts = experts or dict.fromkeys(ROUTER_STATE, 64)
    state = {fqn: torch.empty(size) for fqn, size in experts.items()}
    dcp.load(state, checkpoint_id=str(folder))
    return state


# torchtitan's EP on gloo needs its DTensor backend: under the default spmd_types backend it
# exchanges tokens with a list all_to_all, which gloo refuses for uneven splits ("invalid
# tensor size at index 1"); the DTensor backend uses all_to_all_single, which gloo takes.
TORCHTITAN_EP = ("--parallelize", "torchtitan", *EP, "--parallelism.spmd_backend", "full_dtensor")
RUNS = {
    "eager": ((*FINAL_SAVE, "--parallelize", "torchtitan", "--training.local_batch_size", "8"), 1),
    "torchtitan_ep": ((*FINAL_SAVE, *TORCHTITAN_EP), 2),
    "autoparallel_ep": ((*FINAL_SAVE, *EP), 2),
    # Inductor compiles the expert-parallel forward and backward (unbacked token counts).
    "autoparallel_ep_compiled": ((*FINAL_SAVE, *EP, "--compile.enable"), 2),
}
Shards = dict[str, tuple[tuple[int, ...], list[tuple[tuple[int, ...], tuple[int, ...]]]]]
_TRAINED: dict[str, tuple[Trained, dict[str, torch.Tensor], Shards]] = {}


def _saved_shards(dump: Path, fqns: set[str], step: int = STEPS) -> Shards:
    """FQN -> (global size, sorted (offsets, sizes) of each piece) of ``fqns`` as the run's
    ranks wrote them to its checkpoint at ``step``: DCP records one piece per distinct local
    shard (a replicated tensor is written once, whole)."""
    import torch.distributed.checkpoint as dcp

    folder = dump / "checkpoint" / f"step-{step}"
    metadata = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {
        fqn: (
            tuple(metadata[fqn].size),
            sorted((tuple(c.offsets), tuple(c.sizes)) for c in metadata[fqn].chunks),
        )
        for fqn in fqns
    }


def _assert_whole_experts_per_rank(shards: Shards, ranks: int) -> None:
    """Each expert weight is split on its expert dim into ``ranks`` pieces of whole experts
    (every other dim complete), one per rank."""
    for fqn, (size, pieces) in shards.items():
        experts, *rest = size
        per_rank = experts // ranks
        zeros = (0,) * len(rest)
        whole = [((i * per_rank, *zeros), (per_rank, *rest)) for i in range(ranks)]
        assert pieces == whole, (fqn, size, pieces)


@pytest.fixture(scope="module")
def trained(seed_checkpoint, tmp_path_factory) -> dict[str, tuple[Trained, dict, Shards]]:
    root = tmp_path_factory.mktemp("moe")
    for name, (args, ngpu) in RUNS.items():
        run = _train(CONFIG, seed_checkpoint, root / name, *args, ngpu=ngpu, model=MODEL)
        shards = _saved_shards(root / name, _expert_weights([0, 1]))
        _TRAINED[name] = (run, _router_state(root / name), shards)
    return _TRAINED


def test_runs_are_what_they_claim(trained):
    eager, tt_ep, ap_ep, ap_ep_compiled = (trained[name][0].log for name in RUNS)
    assert "AutoParallel: planning" not in eager and "AutoParallel: planning" not in tt_ep
    assert "ep=2" in tt_ep and "ep=1" in eager
    assert "AutoParallel: expert parallelism on 2 MoE layer(s)" in ap_ep
    assert "AutoParallel: planning on mesh {'ep': 2}, global batch 8 x 128" in ap_ep
    # Whole experts on each rank, half of the 64 per layer: the expert weights each rank of
    # the AutoParallel runs held, as it wrote them to the final checkpoint.
    for name in ("autoparallel_ep", "autoparallel_ep_compiled"):
        shards = trained[name][2]
        assert {size[0] for size, _ in shards.values()} == {64}, (name, shards)
        _assert_whole_experts_per_rank(shards, ranks=2)
    assert "parameter tok_embeddings.weight = lm_head.weight" in ap_ep
    assert "AutoParallel: compiled plan" in ap_ep_compiled
    for log in (eager, tt_ep, ap_ep, ap_ep_compiled):
        assert "global batch size 8," in log


@pytest.mark.parametrize("run", ["autoparallel_ep", "autoparallel_ep_compiled"])
def test_autoparallel_ep_matches_eager(run, trained, request, record_property):
    """Every step's loss and gradient norm, every step-1 gradient, and the router's state
    after 20 steps, against torchtitan eager on one rank; eager and compiled."""
    eager, ap = trained["eager"][0], trained[run][0]
    assert sorted(ap.losses) == sorted(eager.losses) == list(range(1, STEPS + 1))
    _report(request, record_property, "max_abs_diff_vs_eager", _max_diffs(eager, ap))
    assert parity_problems(eager, ap) == {"losses": [], "grad_norms": [], "gradients": []}
    # Every parameter has a gradient, experts and router included; clipping would have acted.
    assert {"layers.1.moe.routed_experts.inner_experts.w1_EFD", "lm_head.weight"} <= set(ap.grads)
    assert eager.grad_norms[1] > 1.0
    _assert_router_state_equal(trained["eager"][1], trained[run][1])


def test_autoparallel_ep_matches_torchtitan_ep(trained, request, record_property):
    """Step-1 gradients of every parameter; losses and gradient norms over the steps where
    torchtitan's EP itself still agrees with eager. Routing is discrete: a top-k choice that
    flips on a rounding difference sends tokens elsewhere from then on. torchtitan's EP
    departs from eager within 20 steps here (by ~1e-3 at step 20, expert bias included)
    while AutoParallel's stays with eager (the test above); past that step the two EP runs
    are compared with eager, not with each other."""
    eager, tt_ep, ap = (trained[name][0] for name in ("eager", "torchtitan_ep", "autoparallel_ep"))
    window = _agreeing_prefix(eager, tt_ep)
    _report(request, record_property, "steps_torchtitan_ep_agrees_with_eager", len(window))
    assert len(window) >= 5, f"torchtitan's EP departs from eager at step {len(window) + 1}"
    problems = parity_problems(_steps(tt_ep, window), _steps(ap, window))
    _report(request, record_property, "max_abs_diff_vs_torchtitan_ep", _max_diffs(tt_ep, ap))
    assert problems == {"losses": [], "grad_norms": [], "gradients": []}


def _agreeing_prefix(reference: Trained, run: Trained) -> list[int]:
    """The first steps on which ``run``'s loss and gradient norm agree with ``reference``'s."""
    steps = []
    for step in sorted(reference.losses):
        ok = all(
            abs(got[step] - want[step]) <= ATOL + RTOL * abs(want[step])
            for got, want in (
                (run.losses, reference.losses),
                (run.grad_norms, reference.grad_norms),
            )
        )
        if not ok:
            break
        steps.append(step)
    return steps


def _steps(run: Trained, steps: list[int]) -> Trained:
    return dataclasses.replace(
        run,
        losses={s: run.losses[s] for s in steps},
        grad_norms={s: run.grad_norms[s] for s in steps},
    )


def _max_diffs(want: Trained, got: Trained) -> dict[str, float]:
    return {
        "loss": max(abs(got.losses[s] - want.losses[s]) for s in want.losses),
        "grad_norm": max(abs(got.grad_norms[s] - want.grad_norms[s]) for s in want.grad_norms),
        "step1_grad": max(
            (got.grads[f] - want.grads[f]).abs().max().item()
            for f in set(want.grads) & set(got.grads)
        ),
    }


def _assert_router_state_equal(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]):
    # The hook moved the bias (by +-coeff per step): the buffers were updated, not just kept.
    assert all(value.abs().max() > 0 for value in want.values())
    assert set(got) == set(want)
    for fqn in want:
        torch.testing.assert_close(got[fqn], want[fqn], rtol=RTOL, atol=ATOL)


PP2_EP2 = (
    "--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "4", *EP,
)  # fmt: skip


def test_pipeline_stages_with_expert_parallel_match_eager(
    trained, seed_checkpoint, tmp_path_factory, request, record_property
):
    """PP 2 x EP 2 on 4 ranks (each stage planned on its own ep mesh, the tied embeddings
    split between the stages): every loss, gradient norm and step-1 gradient, and the
    router's state after 20 steps, against 1-rank eager; whole experts on each ep rank."""
    dump = tmp_path_factory.mktemp("moe_pp2_ep2")
    pp = _train(CONFIG, seed_checkpoint, dump, *FINAL_SAVE, *PP2_EP2, ngpu=4, model=MODEL)
    assert pp.log.count("AutoParallel: expert parallelism on 1 MoE layer(s)") == 1  # rank 0
    assert "AutoParallel: planning on mesh {'ep': 2}, global batch 2 x 128" in pp.log
    shards = _saved_shards(dump, _expert_weights([0, 1]))
    _assert_whole_experts_per_rank(shards, ranks=2)
    eager = trained["eager"][0]
    _report(request, record_property, "max_abs_diff_vs_eager", _max_diffs(eager, pp))
    assert parity_problems(eager, pp) == {"losses": [], "grad_norms": [], "gradients": []}
    assert {"tok_embeddings.weight", "lm_head.weight"} <= set(pp.grads)
    _assert_router_state_equal(trained["eager"][1], _router_state(dump))


def test_the_plan_report_names_the_collectives_that_run(trained, request, record_property):
    """The plan's counts, all_to_all included, are what step 2 ran on rank 0 (profiler),
    plus torchtitan's own all-reduces and its load-balancing hook's."""
    ap = trained["autoparallel_ep"][0]
    plan = plan_collectives(ap.log, "eager, after bucketing")
    assert plan["all_to_all"] == 10  # per MoE layer: counts, tokens out and back, 2 backward
    extra = TORCHTITAN_ALL_REDUCES + LOAD_BALANCING_ALL_REDUCES
    expected = {**plan, "all_reduce": plan.get("all_reduce", 0) + extra}
    _report(request, record_property, "collectives_run", ap.collectives)
    assert ap.collectives == expected


# --- Expert parallelism inside data parallelism: EP 2 x efsdp 2 on 4 gloo ranks ---
# Two ep groups of 2 ranks each hold every expert and see different tokens, so each expert
# gradient is a partial sum over efsdp that the plan must reduce (parallelize/expert_parallel.py).
# torchtitan's own EP fails on 4 gloo ranks ("ProcessGroupGloo::alltoall: invalid tensor
# size"): the reference is 1-rank eager, from the same seed checkpoint and global batches.
EFSDP = ("--training.local_batch_size", "2")  # 4 ranks x 2 rows: eager's global batch of 8
EFSDP_MESH = "AutoParallel: planning on mesh {'efsdp': 2, 'ep': 2}, global batch 8 x 128"
EXPERT_WEIGHTS = ("w1_EFD", "w2_EDF", "w3_EFD")


def _expert_weights(layers: list[int]) -> set[str]:
    return {
        f"layers.{layer}.moe.routed_experts.inner_experts.{weight}"
        for layer in layers
        for weight in EXPERT_WEIGHTS
    }


@pytest.fixture(scope="module")
def trained_efsdp(seed_checkpoint, tmp_path_factory) -> dict[str, tuple[Trained, dict]]:
    root = tmp_path_factory.mktemp("moe_efsdp")
    # The compiled run loads the eager run's placement file: one solve for both.
    placements = ("--autoparallel.placement_file", str(root / "placements.json"))
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile.enable",))):
        run = _train(
            CONFIG, seed_checkpoint, root / name,
            *FINAL_SAVE, *EP, *EFSDP, *placements, *extra,
            ngpu=4, model=MODEL,
        )  # fmt: skip
        runs[name] = (run, _router_state(root / name))
    return runs


@pytest.mark.parametrize("run", ["eager", "compiled"])
def test_ep_inside_efsdp_matches_eager(run, trained, trained_efsdp, request, record_property):
    """Every step's loss and gradient norm, every step-1 gradient under every name and the
    router's state after 20 steps, against 1-rank eager; eager and compiled."""
    eager, (ap, router) = trained["eager"][0], trained_efsdp[run]
    assert EFSDP_MESH in ap.log
    assert "expert gradients: reduce_scatter over efsdp: 6 of 6" in ap.log
    # Whole experts on ep, sharded further over efsdp: a quarter of the 64 stored per rank.
    assert "experts per rank: 16 of 64 per layer" in ap.log
    if run == "compiled":
        assert "AutoParallel: compiled plan" in ap.log
        assert "AutoParallel: loaded placements from" in ap.log
    assert sorted(ap.losses) == list(range(1, STEPS + 1))
    _report(request, record_property, "max_abs_diff_vs_eager", _max_diffs(eager, ap))
    assert parity_problems(eager, ap) == {"losses": [], "grad_norms": [], "gradients": []}
    assert _expert_weights([0, 1]) | {"layers.1.moe.router.gate.weight"} <= set(ap.grads)
    _assert_router_state_equal(trained["eager"][1], router)


def test_ep_inside_efsdp_fails_parity_without_the_expert_reduction(
    trained, seed_checkpoint, tmp_path_factory, request, record_property
):
    """The checks above catch the fault they target: expert gradients declared complete on
    efsdp (the plan drops their reduction; the start-up check is turned off so it trains).
    Exactly the expert weights' step-1 gradients differ, and the gradient norm."""
    eager = trained["eager"][0]
    faulty = _train(
        CONFIG, seed_checkpoint, tmp_path_factory.mktemp("moe_efsdp_fault"), *EP, *EFSDP,
        ngpu=4, steps=3, model=MODEL,
        env=fault_env("drop_expert_grad_reduction_unchecked"),
    )  # fmt: skip
    assert "[fault-shim] drop_expert_grad_reduction_unchecked injected" in faulty.log
    assert "expert gradients: none: 6 of 6" in faulty.log
    problems = parity_problems(eager, faulty)
    _report(request, record_property, "caught", {k: v[:2] for k, v in problems.items() if v})
    assert {line.split(":")[0] for line in problems["gradients"]} == _expert_weights([0, 1])
    assert problems["grad_norms"]


def test_start_up_refuses_a_plan_that_drops_the_expert_reduction():
    """The same fault with the start-up check on: planning (4 fake ranks, one process)
    stops before the solve, naming every expert weight."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.plan_probe", "--world", "4", "--config", CONFIG, *EP,
         *EFSDP, "--training.seq_len", "128"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, **fault_env("drop_expert_grad_reduction")},
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    refusal = next(
        (line for line in output.splitlines() if "refusing a plan that drops expert" in line), ""
    )
    assert "expert gradient reductions over efsdp" in refusal, output[-3000:]
    assert all(fqn in refusal for fqn in _expert_weights([0, 1])), refusal
    assert "AutoParallel: planning on mesh" not in output  # before the constraints and solve


DEEPSEEK = "deepseek_v3_debugmodel_autoparallel"
# Its first layer is dense; the second has 8 routed experts (top 6), 2 shared ones and
# expert-bias routing.
DEEPSEEK_ROUTER_STATE = {"layers.1.moe.expert_bias_E": 8}


@pytest.fixture(scope="module")
def deepseek_trained(tmp_path_factory) -> dict[str, tuple[Trained, dict]]:
    root = tmp_path_factory.mktemp("deepseek")
    run_train(
        DEEPSEEK, "--checkpoint.create_seed_checkpoint", "--checkpoint.enable",
        "--debug.seed", SEED, ngpu=1, dump_folder=root / "seed", model="deepseek_v3",
    ).check()  # fmt: skip
    seed = root / "seed" / "checkpoint"
    runs = {}
    for name, args, ngpu in (
        ("eager", ("--parallelize", "torchtitan", "--training.local_batch_size", "8"), 1),
        ("ep2_efsdp2", (*EP, *EFSDP), 4),
    ):
        run = _train(
            DEEPSEEK, seed, root / name, *FINAL_SAVE, *args, ngpu=ngpu, model="deepseek_v3"
        )
        runs[name] = (run, _router_state(root / name, DEEPSEEK_ROUTER_STATE))
    return runs


def test_deepseek_ep_inside_efsdp_matches_eager(deepseek_trained, request, record_property):
    """DeepSeek-V3's debug model (shared experts, expert bias) in the same shape."""
    (eager, eager_router), (ap, router) = deepseek_trained["eager"], deepseek_trained["ep2_efsdp2"]
    assert "AutoParallel: planning" not in eager.log
    assert EFSDP_MESH in ap.log
    assert "expert gradients: reduce_scatter over efsdp: 3 of 3" in ap.log
    _report(request, record_property, "max_abs_diff_vs_eager", _max_diffs(eager, ap))
    assert parity_problems(eager, ap) == {"losses": [], "grad_norms": [], "gradients": []}
    shared = {f"layers.1.moe.shared_experts.w{i}.weight" for i in (1, 2, 3)}
    assert _expert_weights([1]) | shared <= set(ap.grads)
    _assert_router_state_equal(eager_router, router)


# --- DCP between AutoParallel with expert parallelism (2 gloo ranks) and eager ---

TIED = ["lm_head.weight", "tok_embeddings.weight"]


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory) -> dict:
    import json
    import subprocess
    import sys

    workdir = tmp_path_factory.mktemp("moe_dcp")
    flags = [f"--flag={flag}" for flag in EP]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.checkpoint_roundtrip", str(workdir),
         "--config", CONFIG, "--ranks", "2", *flags],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"round trip exited {proc.returncode}:\n{output[-6000:]}"
    return json.loads((workdir / "results.json").read_text())


def _assert_tied(report: dict, where: str) -> None:
    assert report["tied_parameters_one_object"], f"{where}: {TIED} are two tensors"
    assert report["parameter_groups"] == [TIED], (where, report["parameter_groups"])
    assert report["verify"] == "ok", f"{where}: {report['verify']}"


def test_checkpoints_hold_torchtitans_keys_router_state_included(roundtrip):
    keys = roundtrip["checkpoint_keys"]
    assert keys["autoparallel"] == keys["eager"]
    assert set(ROUTER_STATE) <= set(keys["eager"]) and set(TIED) <= set(keys["eager"])
    assert "layers.1.moe.routed_experts.inner_experts.w2_EDF" in keys["eager"]
    for rank in roundtrip["autoparallel"]:
        assert rank["saved_keys"] == keys["eager"]


def test_each_rank_holds_whole_experts(roundtrip):
    for rank in roundtrip["autoparallel"]:
        rows = rank["expert_rows"]
        assert len(rows) == 6 and all(r == [32, 64] for r in rows.values()), rows
        _assert_tied(rank["aliases_after_init"], "AutoParallel after init")


@pytest.mark.parametrize("direction", ["eager_into_autoparallel", "autoparallel_into_eager"])
def test_checkpoint_loads_both_ways(direction, roundtrip):
    if direction == "eager_into_autoparallel":
        loads = [
            (f"rank {r}", rank["load_eager"]) for r, rank in enumerate(roundtrip["autoparallel"])
        ]
    else:
        loads = [("eager", roundtrip["eager_load"])]
    for where, loaded in loads:
        compare = loaded["compare"]
        assert not compare["missing"] and not compare["unexpected"], compare
        assert compare["differing"] == [], f"{where}: {compare}"
        assert loaded["load_changed_values"], f"{where}: the load left the init in place"
        _assert_tied(loaded["aliases"], f"{where} after load")
