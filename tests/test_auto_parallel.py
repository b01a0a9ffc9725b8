"""AliasAwareAutoParallel: its config on torchtitan's CLI, and the plans it builds."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
from torchtitan.config import ConfigManager

from tests.support.training import REPO_ROOT
from torchtitan_ext.parallelize import AliasAwareAutoParallel, plan_model
from torchtitan_ext.parallelize.spec import AUTOPARALLEL_COMMIT

CONFIG = "llama3_debugmodel_autoparallel"


def parse(*args: str, config: str = CONFIG):
    return ConfigManager().parse_args(["--module", "config_registry", "--config", config, *args])


def titan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torchtitan.train", "--module", "config_registry", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
    )


def test_config_is_a_torchtitan_configurable():
    config_cls = AliasAwareAutoParallel.Config
    assert "__slots__" in config_cls.__dict__
    assert all(f.kw_only for f in dataclasses.fields(config_cls))
    assert config_cls._owner is AliasAwareAutoParallel


def test_cli_overrides_reach_the_parsed_config():
    config = parse(
        "--autoparallel.param_memory_low", "0.25",
        "--autoparallel.param-memory-high", "0.5",
        "--autoparallel.alias_check", "warn",
        "--autoparallel.placement_file", "plan/placements.json",
        "--autoparallel.dump_placements",
        "--autoparallel.no-parallel-matmuls",
        "--parallelize", "torchtitan",
    )  # fmt: skip
    ap = config.autoparallel
    assert (ap.param_memory_low, ap.param_memory_high) == (0.25, 0.5)
    assert ap.alias_check == "warn"
    assert ap.placement_file == "plan/placements.json"
    assert ap.dump_placements and not ap.parallel_matmuls
    assert config.parallelize == "torchtitan"
    assert parse().autoparallel == AliasAwareAutoParallel.Config()


@pytest.mark.engine
def test_cli_overrides_reach_the_built_component():
    config = parse("--autoparallel.alias_check", "off", "--autoparallel.param_memory_high", "0.5")
    component = config.autoparallel.build()
    assert isinstance(component, AliasAwareAutoParallel)
    assert component.config.alias_check == "off"
    assert component.config.param_memory_high == 0.5
    assert component.config is not config.autoparallel  # build() works on a copy


def test_help_lists_every_field_with_its_docstring():
    proc = titan_cli("--config", CONFIG, "--help")
    assert proc.returncode == 0, proc.stderr
    # tyro draws boxes and wraps long lines: compare the words only.
    text = " ".join(re.sub("[\u2500-\u257f]", " ", proc.stdout).split())
    for field in dataclasses.fields(AliasAwareAutoParallel.Config):
        flag = field.name.replace("_", "-")
        assert f"--autoparallel.{flag}" in text or f"--autoparallel.{field.name}" in text, field
    assert "What to do when the parallel model's aliases do not match" in text
    assert "is loaded and the solve is skipped" in text
    assert "{error,warn,off}" in text


def test_a_wrong_value_gets_tyros_error():
    proc = titan_cli("--config", CONFIG, "--autoparallel.alias_check", "maybe")
    assert proc.returncode != 0
    assert "invalid choice" in proc.stdout + proc.stderr
    assert "error" in proc.stdout + proc.stderr and "warn" in proc.stdout + proc.stderr


def test_unknown_config_lists_the_available_ones():
    proc = titan_cli("--config", "llama3_nope_autoparallel")
    assert proc.returncode != 0
    assert "llama3_debugmodel_autoparallel" in proc.stderr
    assert "qwen3_0_6b_autoparallel" in proc.stderr


def test_missing_autoparallel_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "autoparallel", None)  # import now fails
    monkeypatch.setitem(sys.modules, "autoparallel.api", None)
    with pytest.raises(ImportError) as info:
        AliasAwareAutoParallel.Config().build()
    message = str(info.value)
    assert f"autoparallel.git@{AUTOPARALLEL_COMMIT}" in message
    assert "pip install" in message and "unrelated" in message
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["autoparallel"]
    assert any(AUTOPARALLEL_COMMIT in requirement for requirement in extra), extra


# --- plans, on a fake 2-rank process group (tracing and solving only) ---


def parallelize(config, *, dump_folder):
    return plan_model(config, world_size=2, dump_folder=str(dump_folder))


@pytest.fixture(scope="module")
def fsdp_like(two_fake_ranks, tmp_path_factory):
    dump = tmp_path_factory.mktemp("fsdp_like")
    config = parse("--autoparallel.placement_file", "placements.json")
    return (*parallelize(config, dump_folder=dump), dump)


def names(module):
    return (
        [n for n, _ in module.named_parameters(remove_duplicate=False)],
        [n for n, _ in module.named_buffers(remove_duplicate=False)],
        list(module.state_dict(keep_vars=True)),
    )


def live_placements(module) -> dict[str, str]:
    """FQN -> placement of each parameter as the module holds it (its DTensor's mesh axes
    and placements, e.g. "dp_shard=S(0)"), read from the module, not from the plan report."""
    from torch.distributed.tensor import DTensor

    placements = {}
    for fqn, param in module.named_parameters():
        assert isinstance(param, DTensor), (fqn, type(param))
        axes = param.device_mesh.mesh_dim_names
        placements[fqn] = ", ".join(f"{a}={p}" for a, p in zip(axes, param.placements, strict=True))
    return placements


def run_matmuls(module, *, batch: int, seq_len: int) -> list[tuple[int, int, int]]:
    """(rows, columns, FLOPs) of every matmul and attention call that ``module``'s forward
    executes on a batch of ``batch`` x ``seq_len`` tokens, in order. It runs on a CPU copy
    (uninitialized weights; the fake group's collectives move no data, shapes are real), so
    the fixture's meta module is left as it is. A parallel module checks the shapes it is
    called with (AutoParallel refuses any other than this rank's share of the batch)."""
    import copy

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    matmuls = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default)
    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in matmuls or func is torch.ops.aten.addmm.default:
                a = args[1] if func is torch.ops.aten.addmm.default else args[0]
                rows = out.numel() // out.shape[-1]
                calls.append((rows, out.shape[-1], 2 * out.numel() * a.shape[-1]))
            elif "scaled_dot_product" in func.__name__:
                q, k = args[0], args[1]  # (batch, heads, queries, dim), (..., keys, dim)
                rows = q.numel() // q.shape[-1]
                calls.append((rows, q.shape[-1], 4 * rows * k.shape[-2] * q.shape[-1]))
            return out

    runnable = copy.deepcopy(module).to_empty(device="cpu")
    tokens = torch.zeros(batch, seq_len, dtype=torch.long)
    positions = torch.arange(seq_len).repeat(batch, 1)
    with Record():
        runnable(tokens, positions=positions)
    return calls


@pytest.mark.engine
def test_fsdp_like_plan_shards_parameters_and_the_batch(fsdp_like):
    from torch.distributed.tensor import Shard

    model, parallel, component, dump = fsdp_like
    report = component.report
    assert report.mesh == {"dp_shard": 2}
    # Every parameter the parallel module holds is Shard(0) on dp_shard, and this rank's
    # local shard is its half of the rows (read from the module's DTensors).
    for fqn, param in parallel.named_parameters():
        assert param.device_mesh.mesh_dim_names == ("dp_shard",), (fqn, param.device_mesh)
        assert tuple(param.placements) == (Shard(0),), (fqn, param.placements)
        local = (-(-param.shape[0] // 2), *param.shape[1:])
        assert tuple(param.to_local().shape) == local, (fqn, param.to_local().shape, local)
    assert set(report.planned) == {"all_gather", "reduce_scatter"}
    # One gradient reduce-scatter per unique parameter; gathers before use in the
    # forward and again in the backward (reshard_after_forward).
    unique = len(list(model.parameters()))
    assert report.planned["reduce_scatter"].count == unique
    assert report.planned["all_gather"].count == 2 * unique - 1
    # Eager runs them bucketed (eager_overlap): a few collectives moving the same bytes.
    assert report.bucketed and set(report.collectives) == set(report.planned)
    for kind, planned in report.planned.items():
        assert report.collectives[kind].count * 5 <= planned.count, (kind, report.collectives)
        assert report.collectives[kind].bytes == planned.bytes, kind
    # Half the batch in every matmul, and half the model's forward matmul FLOPs: what the
    # parallel module executes on this rank's 8 rows (the only batch it accepts) against the
    # unparallelized model on the global 16.
    training = parse().training
    batch = 2 * training.local_batch_size  # global: each of the 2 dp_shard ranks' rows
    with pytest.raises(ValueError, match=r"but expected \(8, 256\)"):
        run_matmuls(parallel, batch=batch, seq_len=training.seq_len)
    ran = run_matmuls(parallel, batch=batch // 2, seq_len=training.seq_len)
    whole = run_matmuls(model, batch=batch, seq_len=training.seq_len)
    assert len(ran) == len(whole) == 6 * 6 + 1  # per layer: 5 linears and attention; lm_head
    assert [cols for _, cols, _ in ran] == [cols for _, cols, _ in whole]
    pairs = list(zip(ran, whole, strict=True))
    assert {rows / global_rows for (rows, *_), (global_rows, *_) in pairs} == {0.5}, pairs
    assert sum(f for *_, f in ran) / sum(f for *_, f in whole) == pytest.approx(0.5)
    assert names(parallel) == names(model)
    assert parallel.tok_embeddings.weight is parallel.lm_head.weight
    # plan.json states the mesh and the placements the parallel module holds.
    written = json.loads((dump / "autoparallel" / "plan.json").read_text())
    assert written["mesh"] == {"dp_shard": 2}
    assert {
        fqn: placement for placement, fqns in written["parameters"].items() for fqn in fqns
    } == live_placements(parallel), written["parameters"]


@pytest.mark.slow  # a second trace and apply of the debug model
@pytest.mark.engine
def test_placement_file_is_saved_then_loaded_without_a_solve(fsdp_like, monkeypatch):
    model, parallel, component, dump = fsdp_like
    assert (dump / "placements.json").is_file()

    def no_solve(self, *args, **kwargs):
        raise AssertionError("the solver ran although a placement file exists")

    from autoparallel.api import AutoParallel

    monkeypatch.setattr(AutoParallel, "optimize_placement", no_solve)
    # Without the graph cache, which would skip AutoParallel altogether (test_graph_cache).
    config = parse(
        "--autoparallel.placement_file", "placements.json", "--autoparallel.graph_cache_dir", ""
    )
    _, loaded, loaded_component = parallelize(config, dump_folder=dump)
    assert loaded_component.report == component.report
    placements = {n: p.placements for n, p in parallel.named_parameters()}
    assert {n: p.placements for n, p in loaded.named_parameters()} == placements


# --- expert parallelism: the regions and the mesh, before any tracing ---

MOE = "qwen3_moe_debug_autoparallel"


def test_expert_parallel_regions_keep_parameters_buffers_and_names(two_fake_ranks):
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from torchtitan_ext.parallelize.expert_parallel import (
        LocalMapRoutedExperts,
        LocalMapTokenDispatcher,
        enable_expert_parallel,
    )

    config = parse("--parallelism.expert_parallel_degree", "2", config=MOE)
    with torch.device("meta"):
        model = config.model_spec.model.build()
    before = names(model)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    assert enable_expert_parallel(model, mesh=mesh, axes=("ep",)) == 2
    assert names(model) == before
    after = dict(model.named_parameters()) | dict(model.named_buffers())
    assert all(after[name] is tensor for name, tensor in tensors.items())
    for layer in model.layers.values():
        routed = layer.moe.routed_experts
        assert type(routed) is LocalMapRoutedExperts
        assert type(routed.token_dispatcher) is LocalMapTokenDispatcher
        assert routed.token_dispatcher.ep_mesh.size() == 2
        assert routed.compute_dtype is None  # on CPU: Float32GroupedExperts, float32

    with torch.device("meta"):
        odd = config.model_spec.model.build()
    odd.layers["1"].moe.routed_experts.inner_experts.num_experts = 3
    with pytest.raises(ValueError, match=r"layers\.1\.moe\.routed_experts: 3 experts do not split"):
        enable_expert_parallel(odd, mesh=mesh, axes=("ep",))


def test_expert_parallel_configs_parse_on_a_gpu_host(monkeypatch):
    """On a GPU host (CPU adaptations off), torchtitan would refuse EP with CUDA graphs on."""
    import torch

    from torchtitan_ext import cpu

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    assert not cpu.use_cpu()
    ep2 = ("--parallelism.expert_parallel_degree", "2")
    for name, flags in ((MOE, ep2), ("deepseek_v3_debugmodel_autoparallel", ep2), (CONFIG, ())):
        assert parse(*flags, config=name).training.disable_cuda_graphs, name


def test_expert_parallel_plans_on_torchtitans_sparse_mesh():
    from torchtitan.distributed import ParallelDims

    from torchtitan_ext.parallelize.spec import check_parallel_dims, mesh_axes

    def axes(world: int, *flags: str) -> dict[str, int]:
        dims = ParallelDims.from_config(parse(*flags, config=MOE).parallelism, world)
        check_parallel_dims(dims)
        return mesh_axes(dims, spmd_backend="spmd_types")

    ep2 = ("--parallelism.expert_parallel_degree", "2")
    assert axes(2, *ep2) == {"ep": 2}
    assert axes(8, *ep2, "--parallelism.data_parallel_shard_degree", "8") == {"efsdp": 4, "ep": 2}
    assert axes(
        8, *ep2, "--parallelism.data_parallel_replicate_degree", "2",
        "--parallelism.data_parallel_shard_degree", "4",
    ) == {"dp_replicate": 2, "efsdp": 2, "ep": 2}  # fmt: skip


@pytest.mark.slow  # a second plan of the debug model
@pytest.mark.engine
def test_replicate_mesh_gets_the_ddp_like_plan(two_fake_ranks, tmp_path):
    config = parse(
        "--parallelism.data_parallel_replicate_degree", "2",
        "--parallelism.data_parallel_shard_degree", "1",
        "--autoparallel.no-eager-overlap",
    )  # fmt: skip
    model, parallel, component = parallelize(config, dump_folder=tmp_path)
    report = component.report
    assert report.mesh == {"dp_replicate": 2}
    # No parameter is sharded: the parallel module holds each whole, replicated.
    placements = live_placements(parallel)
    assert set(placements.values()) == {"dp_replicate=R"}, placements
    for fqn, param in parallel.named_parameters():
        assert param.to_local().shape == param.shape, (fqn, param.to_local().shape)
    assert set(report.parameters) == {"dp_replicate=R"}, report.parameters
    # Without eager_overlap each step runs the plan as built: a gradient all-reduce each.
    assert not report.bucketed
    assert report.collectives["all_reduce"].count == len(list(model.parameters()))
    assert set(report.collectives) == {"all_reduce"}, report.collectives
    assert report.forward_flop_share == pytest.approx(0.5)


@pytest.mark.slow  # a second plan of the debug model
@pytest.mark.engine
def test_ddp_like_plan_runs_eager_with_bucketed_all_reduces(two_fake_ranks, tmp_path):
    """eager_overlap on a DDP-like plan: the overlap scheduler used to raise on cyclic
    ordering hints in its backward (torch 2.14), failing the start."""
    config = parse(
        "--parallelism.data_parallel_replicate_degree", "2",
        "--parallelism.data_parallel_shard_degree", "1",
    )  # fmt: skip
    _, _, component = parallelize(config, dump_folder=tmp_path)
    report = component.report
    assert report.bucketed and set(report.collectives) == {"all_reduce"}, report.collectives
    planned, run = report.planned["all_reduce"], report.collectives["all_reduce"]
    assert run.count * 5 <= planned.count and run.bytes == planned.bytes, (run, planned)


@pytest.mark.slow  # a second plan of the debug model
@pytest.mark.engine
def test_no_reshard_after_forward_drops_the_backward_gathers(two_fake_ranks, tmp_path):
    config = parse("--parallelism.fsdp_reshard_after_forward", "never")
    model, _, component = parallelize(config, dump_folder=tmp_path)
    unique = len(list(model.parameters()))
    assert component.report.planned["all_gather"].count == unique
    assert component.report.planned["reduce_scatter"].count == unique


# Plans on meshes of other sizes than this process's: the debug config cut to 1 layer, traced
# and solved on a fake group in a fresh process. Each is one single-threaded trace and solve
# of 1-2 minutes, so both start together (2 cores) and each test waits for its own.
TWO_D_MESHES = {
    "dp_shard4_tp2": (8, (
        "--parallelism.data_parallel_shard_degree", "4",
        "--parallelism.tensor_parallel_degree", "2",
    )),
    "hsdp": (4, (
        "--parallelism.data_parallel_replicate_degree", "2",
        "--parallelism.data_parallel_shard_degree", "2",
    )),
}  # fmt: skip


@pytest.fixture(scope="module")
def two_d_plans():
    probe = [sys.executable, "-m", "tests.support.plan_probe", "--layers", "1"]
    procs = {
        name: subprocess.Popen(
            [*probe, "--world", str(world), *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (world, args) in TWO_D_MESHES.items()
    }

    def report(name: str) -> dict:
        stdout, stderr = procs[name].communicate(timeout=900)
        assert procs[name].returncode == 0, stderr[-3000:]
        return json.loads(stdout.strip().splitlines()[-1])

    yield report
    for proc in procs.values():
        proc.kill()
        proc.communicate()


@pytest.mark.slow  # the two 2-D plans take 1.5 min
@pytest.mark.engine
def test_dp_shard_by_tp_mesh_shards_attention_and_mlp_weights_on_tp(two_d_plans):
    """dp_shard=4 x tp=2 on a fake 8-rank group: Megatron-style TP inside FSDP."""
    report = two_d_plans("dp_shard4_tp2")
    assert report["mesh"] == {"dp_shard": 4, "tp": 2}
    tp_sharded = {
        fqn.split(".", 2)[-1]
        for placement, fqns in report["parameters"].items()
        if "tp=S(" in placement
        for fqn in fqns
        if fqn.startswith("layers.")
    }
    for weight in (
        "attention.qkv_linear.wqkv.weight",
        "attention.wo.weight",
        "feed_forward.w1.weight",
        "feed_forward.w2.weight",
        "feed_forward.w3.weight",
    ):
        assert weight in tp_sharded, (weight, report["parameters"])  # fmt: skip
    assert report["forward_flop_share"] == pytest.approx(1 / 8)


@pytest.mark.slow
@pytest.mark.engine
def test_replicate_by_shard_mesh_gets_hsdp(two_d_plans):
    """dp_replicate=2 x dp_shard=2: parameters replicated across the replicate axis and
    sharded within each group, as torchtitan's knobs say, every matmul on 1/4 of the batch."""
    report = two_d_plans("hsdp")
    assert report["mesh"] == {"dp_replicate": 2, "dp_shard": 2}
    assert all(p.startswith("dp_replicate=R, dp_shard=S(") for p in report["parameters"]), report
    assert report["forward_flop_share"] == pytest.approx(1 / 4)


def test_matmul_sizes_of_a_dynamic_trace_count_by_their_example_values():
    """Expert parallelism traces with symbolic sizes: a backed size counts by its example
    value; a routed (unbacked) size is unknown, and a report with no known matmul says so
    rather than claiming the whole model."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from torchtitan_ext.parallelize.report import PlanReport, _size_hint

    env = ShapeEnv()
    backed = env.create_symintnode(env.create_symbol(8, source=ConstantSource("batch")), hint=8)
    assert _size_hint(backed * 4) == 32
    assert _size_hint(env.create_unbacked_symint() * 4) is None
    assert _size_hint(6) == 6
    (line,) = [line for line in PlanReport(mesh={"ep": 2}).lines() if "matmul FLOPs" in line]
    assert line == "forward matmul FLOPs on this rank: unknown (no matmul of known size)"


def _plan_on_ranks(ranks: int, *args: str) -> tuple[int, str]:
    """tests.support.plan_probe on ``ranks`` gloo ranks (torchrun, every rank's output)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
         "--tee", "3", "-m", "tests.support.plan_probe", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow  # 2 gloo ranks under torchrun (~20 s)
@pytest.mark.engine
def test_one_rank_solves_and_the_others_apply_its_plan():
    """On 2 gloo ranks, rank 0 builds the solver's ILP and solves; rank 1 receives its
    placements, building no ILP: both apply the same plan (every parameter's placements)."""
    returncode, output = _plan_on_ranks(2, "--layers", "1")
    assert returncode == 0, output[-3000:]
    ranks = {
        point["rank"]: point
        for line in output.splitlines()
        if '{"rank"' in line
        for point in [json.loads(line[line.index("{") :])]
    }
    assert {r: (p["solves"], p["ilps"]) for r, p in ranks.items()} == {0: (1, 1), 1: (0, 0)}
    assert ranks[0]["report"]["parameters"] == ranks[1]["report"]["parameters"]
    assert ranks[1]["report"]["parameters"], ranks[1]["report"]


@pytest.mark.slow  # 2 gloo ranks under torchrun (~20 s)
@pytest.mark.engine
def test_a_failed_solve_stops_every_rank_with_its_error():
    """Rank 0's solve raises: rank 1, waiting for its placements, stops with rank 0's
    error instead of waiting for a timeout."""
    returncode, output = _plan_on_ranks(2, "--layers", "1", "--fail-solve")
    assert returncode != 0
    rank1 = [line for line in output.splitlines() if "[rank1]" in line and "Error" in line]
    assert any(
        "the mesh's first rank failed to solve: RuntimeError: probe: rank 0's solve failed" in line
        for line in rank1
    ), output[-3000:]


@pytest.mark.slow
@pytest.mark.engine
def test_a_rank_that_traced_another_graph_stops_naming_it():
    """Rank 1 builds a 1-layer model, rank 0 a 2-layer one: rank 1 cannot match rank 0's
    placements to its graph and stops, saying so, instead of applying a plan for another
    graph."""
    returncode, output = _plan_on_ranks(2, "--layers", "2", "--rank1-layers", "1")
    assert returncode != 0
    assert any(
        "[rank1]" in line and "rank 1 traced another graph than the mesh's first rank" in line
        for line in output.splitlines()
    ), output[-3000:]
