"""Loss parity with eager: the same model, weights, seed and data trained (a) eagerly on one
rank (the same config through torchtitan's own parallelize, ``--parallelize torchtitan``)
and (b) through AliasAwareAutoParallel on 2 ranks, both from one seed checkpoint,
deterministic, float32 on CPU, 20 steps of 8 x 128 tokens.

The dataloader makes a 1-rank run with local batch 8 and a 2-rank run with local batch 4
see the same global batches (GlobalBatchTextDataLoader), so the losses and gradients may
differ only by floating-point reduction order. Losses are read at full precision from
TensorBoard (``loss_metrics/global_avg_loss``, as torchtitan's scripts/loss_compare.py
does); step-1 gradients from ``--grad_dump_step 1``.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests._training import run_train
from tests.integration.run_tests import engine_skip_mark

needs_engine = engine_skip_mark()

pytestmark = [pytest.mark.slow, pytest.mark.engine, needs_engine]

# variant -> (config, extra flags of the AutoParallel run). The shared-RoPE run is compiled
# (autoparallel_backend, bucketing on), so it also checks compiled numerics against eager.
VARIANTS = {
    "tied": ("llama3_debugmodel_autoparallel", ()),
    "shared_rope_compiled": ("llama3_debugmodel_shared_rope_autoparallel", ("--compile.enable",)),
}
STEPS = 20
# Half the configs' 256 tokens: the same parity, 45 s less CI time for the two variants.
SEQ_LEN = 128
RTOL, ATOL = 1e-4, 1e-5
SEED = "42"
TB_LOSS_TAG = "loss_metrics/global_avg_loss"


def tensorboard_losses(dump_folder: Path) -> dict[int, float]:
    """step -> loss, as logged to TensorBoard under <dump_folder>/tb/<timestamp>/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p for p in (dump_folder / "tb").iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one TensorBoard run under {dump_folder / 'tb'}: {runs}"
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    return {s.step: s.value for s in events.Scalars(TB_LOSS_TAG)}


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory) -> Path:
    """torchtitan's seed checkpoint (step-0) of the debug model, seed 42, made once: both
    variants have the same parameters and state_dict keys (the shared RoPE cache is a
    non-persistent buffer), and a key mismatch would fail DCP's load."""
    dump = tmp_path_factory.mktemp("seed")
    run_train(
        VARIANTS["tied"][0],
        "--checkpoint.create_seed_checkpoint",
        "--checkpoint.enable",
        "--debug.seed", SEED,
        ngpu=1,
        dump_folder=dump,
    ).check()  # fmt: skip
    assert (dump / "checkpoint" / "step-0" / ".metadata").is_file()
    return dump / "checkpoint"


def _train(config: str, seed_checkpoint: Path, dump: Path, *args: str, ngpu: int):
    shutil.copytree(seed_checkpoint, dump / "checkpoint")
    start = time.perf_counter()
    run = run_train(
        config,
        "--training.steps", str(STEPS),
        "--training.seq_len", str(SEQ_LEN),
        "--checkpoint.enable", "--checkpoint.load_only",
        "--debug.seed", SEED, "--debug.deterministic",
        "--metrics.enable_tensorboard", "--metrics.save_tb_folder", "tb",
        "--grad_dump_step", "1",
        *args,
        ngpu=ngpu,
        dump_folder=dump,
    ).check()  # fmt: skip
    assert f"Loading the checkpoint from {dump}/checkpoint/step-0." in run.log
    run.seconds = time.perf_counter() - start
    grads = torch.load(dump / "grads" / "step-1.pt")
    return run, tensorboard_losses(dump), grads


_PARITY: dict[str, dict] = {}


def _parity(variant: str, seed_checkpoint: Path, root: Path) -> dict:
    """Train ``variant`` eagerly (1 rank) and through AutoParallel (2 ranks), once."""
    if variant in _PARITY:
        return _PARITY[variant]
    config, ap_args = VARIANTS[variant]
    eager, eager_losses, eager_grads = _train(
        config,
        seed_checkpoint,
        root / "eager",
        "--parallelize", "torchtitan",
        "--training.local_batch_size", "8",
        ngpu=1,
    )  # fmt: skip
    ap, ap_losses, ap_grads = _train(
        config,
        seed_checkpoint,
        root / "autoparallel",
        "--training.local_batch_size", "4",
        *ap_args,
        ngpu=2,
    )  # fmt: skip
    # (a) really is eager and (b) really is AutoParallel on a 2-rank sharded mesh.
    assert "AutoParallel: planning" not in eager.log
    assert f"AutoParallel: planning on mesh {{'dp_shard': 2}}, global batch 8 x {SEQ_LEN}" in ap.log
    assert "global batch size 8," in eager.log and "global batch size 8," in ap.log
    assert "parameter tok_embeddings.weight = lm_head.weight" in ap.log
    if "shared_rope" in config:
        assert "buffer layers.0.attention.rope.cache = layers.1.attention.rope.cache" in ap.log
    _PARITY[variant] = {
        "config": config,
        "ap_log": ap.log,
        "eager_losses": eager_losses,
        "ap_losses": ap_losses,
        "eager_grads": eager_grads,
        "ap_grads": ap_grads,
        "seconds": {"eager": round(eager.seconds, 1), "autoparallel": round(ap.seconds, 1)},
    }
    return _PARITY[variant]


@pytest.fixture(scope="module", params=list(VARIANTS))
def parity(request, seed_checkpoint, tmp_path_factory) -> dict:
    return _parity(request.param, seed_checkpoint, tmp_path_factory.mktemp(request.param))


def _report(request, record_property, name: str, value) -> None:
    record_property(name, value)
    print(f"{request.node.name}: {name} = {value}")


def test_losses_match_eager(parity, request, record_property):
    eager, ap = parity["eager_losses"], parity["ap_losses"]
    assert sorted(eager) == sorted(ap) == list(range(1, STEPS + 1))
    diffs = {step: abs(ap[step] - eager[step]) for step in eager}
    _report(request, record_property, "max_loss_abs_diff", max(diffs.values()))
    _report(request, record_property, "run_seconds", parity["seconds"])
    _report(
        request,
        record_property,
        "max_loss_rel_diff",
        max(d / abs(eager[s]) for s, d in diffs.items()),
    )
    for step in eager:
        assert math.isfinite(ap[step])
        assert diffs[step] <= ATOL + RTOL * abs(eager[step]), (
            f"step {step}: AutoParallel loss {ap[step]!r} vs eager {eager[step]!r}"
        )


def test_step1_gradients_match_eager(parity, request, record_property):
    eager, ap = parity["eager_grads"], parity["ap_grads"]
    assert sorted(ap) == sorted(eager) and len(eager) > 0
    assert all(g is not None for g in eager.values()), "eager has parameters without gradient"
    max_abs, max_grad = 0.0, 0.0
    for fqn, want in eager.items():
        got = ap[fqn]
        assert got is not None, f"{fqn}: no AutoParallel gradient"
        assert got.shape == want.shape, fqn
        torch.testing.assert_close(
            got, want, rtol=RTOL, atol=ATOL, msg=lambda m, f=fqn: f"{f}: {m}"
        )
        max_abs = max(max_abs, (got - want).abs().max().item())
        max_grad = max(max_grad, want.abs().max().item())
    assert max_grad > 0, "every eager gradient is zero"
    _report(request, record_property, "max_grad_abs_diff", max_abs)
    _report(request, record_property, "max_grad_abs", max_grad)


def test_autoparallel_loss_falls(parity):
    losses = [parity["ap_losses"][s] for s in sorted(parity["ap_losses"])]
    assert losses[-1] < losses[0] - 3.0, losses


def _collective_count(log: str, executed: str) -> int:
    """Collectives per step from the plan report's line, e.g. "(eager): 87 all_gather ..."."""
    line = re.search(rf"collectives per step \({re.escape(executed)}\): (.*)", log)
    assert line, f"no '{executed}' collectives line in the log"
    return sum(int(n) for n in re.findall(r"(\d+) [a-z_]+ \(", line[1]))


def test_compiled_runs_at_most_a_fifth_of_the_eager_collectives(
    seed_checkpoint, tmp_path_factory, request, record_property
):
    log = _parity("shared_rope_compiled", seed_checkpoint, tmp_path_factory.mktemp("c"))["ap_log"]
    eager = _collective_count(log, "eager")
    compiled = _collective_count(log, "compiled, after bucketing")
    _report(
        request, record_property, "collectives_per_step", {"eager": eager, "compiled": compiled}
    )
    assert compiled * 5 <= eager, (compiled, eager)
