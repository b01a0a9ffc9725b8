"""CPU support: config adaptations, runtime patches, and AutoParallel's CPU gaps."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
from torchtitan.models.llama3.config_registry import llama3_debugmodel

from torchtitan_ext import cpu, models

pytestmark = pytest.mark.skipif(
    torch.accelerator.is_available(), reason="CPU support is inactive with an accelerator"
)


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A real 1-rank gloo process group in this process."""
    if dist.is_initialized():
        yield
        return
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_use_cpu_env_override(monkeypatch):
    monkeypatch.setenv("TORCHTITAN_EXT_DEVICE", "cpu")
    assert cpu.use_cpu()
    monkeypatch.setenv("TORCHTITAN_EXT_DEVICE", "gpu")
    with pytest.raises(ValueError, match="TORCHTITAN_EXT_DEVICE must be 'auto' or 'cpu'"):
        cpu.use_cpu()


def test_adapt_config():
    config = llama3_debugmodel()
    assert any(config.model_spec.model.traverse(FlexAttention.Config))
    original_parallelize = config.model_spec.parallelize_fn
    cpu.adapt_config(config)
    assert config.training.mixed_precision_param == "float32"
    assert config.training.disable_cuda_graphs
    assert not any(config.model_spec.model.traverse(FlexAttention.Config))
    sdpa = list(config.model_spec.model.traverse(ScaledDotProductAttention.Config))
    assert len(sdpa) == len(config.model_spec.model.layers)
    wrapped = config.model_spec.parallelize_fn
    assert wrapped is not original_parallelize and wrapped.__wrapped__ is original_parallelize
    cpu.adapt_config(config)  # idempotent: no second wrapper
    assert config.model_spec.parallelize_fn is wrapped


def test_install_runtime_rebinds_every_torchtitan_device_global():
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.parallel_dims as parallel_dims
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.utils as tt_utils

    cpu.install_runtime()
    for module in (tt_utils, metrics, parallel_dims, dist_utils):
        assert module.device_type == "cpu", module.__name__
    leftovers = [
        name
        for name, module in sys.modules.items()
        if name.startswith("torchtitan")
        and module is not None
        and (
            getattr(module, "device_type", None) == "cuda"
            or getattr(module, "device_module", None) is torch.cuda
        )
    ]
    assert not leftovers


_PEAK_RSS_SCRIPT = """
import os, torch
from torchtitan_ext import cpu
monitor = cpu.CPUMemoryMonitor()
before = monitor.get_peak_stats().max_reserved_gib
block = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB, touched
after = monitor.get_peak_stats().max_reserved_gib
del block
monitor.reset_peak_stats()
reset = monitor.get_peak_stats().max_reserved_gib
print(before, after, reset, os.path.exists("/proc/self/clear_refs"))
"""


def test_memory_monitor_reports_peak_rss():
    """In a fresh process: memory freed by earlier tests can be handed out again without
    raising the RSS, which made this flaky inside the suite's process."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT], capture_output=True, text=True, check=True
    ).stdout.split()
    before, after, reset = map(float, out[:3])
    assert after - before > 0.2
    if out[3] == "True":
        assert reset < after - 0.2


@pytest.mark.engine  # install_runtime imports AutoParallel
def test_expand_of_a_sharded_singleton_dim_on_one_rank(one_rank_group):
    """Gap 2: DTensor's view rewrite raised KeyError for aten.expand on a 1-rank mesh."""
    cpu.install_runtime()
    mesh = init_device_mesh("cpu", (1,))
    x = distribute_tensor(torch.randn(4, 1, 8), mesh, [Shard(1)])
    y = x.expand(4, 3, 8)
    torch.testing.assert_close(y.full_tensor(), x.full_tensor().expand(4, 3, 8))


@pytest.mark.engine  # install_runtime imports AutoParallel
def test_strict_view_of_a_dim_sharded_on_one_rank_falls_back(one_rank_group):
    """Gap 2b: aten.view merging a dim sharded on a 1-rank mesh raised instead of falling
    back to replicate (the solver's enumeration stopped on DeepSeek-V3's attention)."""
    cpu.install_runtime()
    mesh = init_device_mesh("cpu", (1,))
    # A size-1 dim removed by a view: "would remove or reshape sharded dimension 1" before.
    x = distribute_tensor(torch.randn(4, 1, 8), mesh, [Shard(1)])
    y = x.view(4, 8)
    torch.testing.assert_close(y.full_tensor(), x.full_tensor().view(4, 8))


def test_moe_experts_compute_in_float32():
    """torchtitan's GroupedExperts casts to bf16; on CPU the configs use Float32GroupedExperts,
    with the same parameters, and its meta kernel lets fake tensors (tracing) through."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torchtitan.models.common.moe import GroupedExperts
    from torchtitan.models.qwen3.config_registry import qwen3_moe_debug

    config = qwen3_moe_debug()
    cpu.adapt_config(config)
    cpu.adapt_config(config)  # idempotent
    experts = [c for *_, c in _configs(config.model_spec.model, GroupedExperts.Config)]
    assert experts and all(type(c) is models.Float32GroupedExperts.Config for c in experts)

    torch.manual_seed(0)
    module = models.Float32GroupedExperts(
        models.Float32GroupedExperts.Config(dim=8, hidden_dim=16, num_experts=3)
    )
    stock = GroupedExperts(GroupedExperts.Config(dim=8, hidden_dim=16, num_experts=3))
    assert [n for n, _ in module.named_parameters()] == [n for n, _ in stock.named_parameters()]
    for p in module.parameters():
        torch.nn.init.normal_(p)
    x, counts = torch.randn(10, 8), torch.tensor([3, 4, 3])
    out = module(x, counts)
    assert out.dtype == torch.float32
    rows = torch.split(x, counts.tolist())
    silu = torch.nn.functional.silu
    w1, w2, w3 = module.w1_EFD, module.w2_EDF, module.w3_EFD
    want = torch.cat([(silu(r @ w1[e].T) * (r @ w3[e].T)) @ w2[e].T for e, r in enumerate(rows)])
    torch.testing.assert_close(out, want)
    cpu.install_runtime()
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert module(torch.randn(10, 8), counts).shape == (10, 8)


def _configs(model_config, config_type):
    for _, _, parent, attr in model_config.traverse(config_type):
        yield parent, attr, (parent[attr] if isinstance(parent, list) else getattr(parent, attr))


def _attention_options(shape: tuple[int, ...]):
    """What AutoParallel's solver is offered for the CPU flash-attention kernel on a 2-rank
    mesh, q/k/v each available replicated or sharded on any dim; and the kernel's node."""
    from autoparallel.shardings.placement_options import get_placement_options
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor._op_schema import OpSpec, OpStrategy

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    mesh = DeviceMesh("cpu", torch.arange(2), _init_backend=False, _rank=0)
    qkv = torch.empty(shape, device="meta")
    meta = TensorMeta(qkv.shape, qkv.stride(), qkv.dtype)
    placements = [Replicate(), *(Shard(d) for d in range(qkv.ndim))]
    specs = [OpStrategy([OpSpec(DTensorSpec(mesh, (p,), tensor_meta=meta)) for p in placements])]
    options = get_placement_options(mesh, op, specs * 3 + [0.0, True], [qkv] * 3 + [0.0, True], {})
    graph = torch.fx.Graph()
    inputs = [graph.placeholder(name) for name in "qkv"]
    for node in inputs:
        node.meta["val"] = qkv
    return options, graph.call_function(op, (*inputs, 0.0, True))


@pytest.mark.engine  # install_runtime imports AutoParallel
def test_solver_may_shard_cpu_flash_attention_by_batch_or_heads():
    """Without our strategies AutoParallel implicitly registers the CPU kernel as
    replicate-only: the full batch on every rank."""
    from torch.distributed.tensor import Replicate

    cpu.install_runtime()
    options, _ = _attention_options((4, 2, 16, 8))
    outputs = {s.output_specs[0].placements for s in options.strategies}
    assert outputs == {(Replicate(),), (Shard(0),), (Shard(1),)}
    for strategy in options.strategies:  # output, logsumexp and q/k/v placed alike
        assert len({spec.placements for spec in strategy.output_specs}) == 1
        assert {spec.placements for spec in strategy.input_specs} == {
            strategy.output_specs[0].placements
        }


@pytest.mark.engine  # install_runtime imports AutoParallel
def test_cost_model_device_limits_on_cpu():
    """AutoParallel's compute cost model (the solver's per-strategy runtime) looks its device
    up through CUDA and raised on CPU; it now costs attention sharded on 2 ranks at half."""
    from autoparallel.cost_models.compute_estimation import estimate_strategy_runtime_cost

    cpu.install_runtime()
    options, node = _attention_options((8, 16, 1024, 64))
    cost = {
        s.output_specs[0].placements[0]: estimate_strategy_runtime_cost(node, s)
        for s in options.strategies
    }
    replicated = cost.pop(next(p for p in cost if p.is_replicate()))
    assert math.isfinite(replicated) and replicated > 0, replicated
    assert list(cost.values()) == [pytest.approx(replicated / 2)] * 2, cost


_TEARDOWN_SCRIPT = """
import atexit, sys, types
from torchtitan_ext import cpu, models, patches
atexit.register(print, "interpreter finalization ran")  # atexit runs last-registered first
if sys.argv[1] != "not-an-entry-point":
    sys.modules["__main__"].__spec__ = types.SimpleNamespace(name="torchtitan.train")
cpu.skip_interpreter_teardown_after_success()
print("training done", flush=True)
if sys.argv[1] == "then-fail":
    raise RuntimeError("failed after close")
"""


@pytest.mark.slow  # a torch process per case
@pytest.mark.parametrize("case", ["success", "then-fail", "not-an-entry-point"])
def test_successful_training_process_skips_interpreter_teardown(case, tmp_path):
    """After a successful run the entry point exits 0 before gloo's teardown can abort it;
    a failure keeps its exit code, and other processes (pytest) are left alone."""
    script = tmp_path / "script.py"
    script.write_text(_TEARDOWN_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), case],
        env={**os.environ, "TORCHTITAN_EXT_DEVICE": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "training done" in proc.stdout
    if case == "success":
        assert proc.returncode == 0, proc.stderr
        assert "interpreter finalization ran" not in proc.stdout
    elif case == "then-fail":
        assert proc.returncode == 1 and "failed after close" in proc.stderr
        assert "interpreter finalization ran" in proc.stdout
    else:
        assert proc.returncode == 0 and "interpreter finalization ran" in proc.stdout


def test_memory_bandwidth_is_measured_on_real_memory_inside_a_fake_mode():
    """The eager overlap scheduler measures the bandwidth while AutoParallel applies its plan,
    under a fake-tensor mode, where a copy costs nothing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        inside = cpu.measure_memory_bandwidth_gbs(nbytes=64 * 2**20)
    low, high = cpu.PLAUSIBLE_CPU_BANDWIDTH_GBS
    assert low <= inside <= high, inside


def test_an_implausible_memory_bandwidth_is_refused(monkeypatch):
    import time

    ticks = iter(i * 1e-9 for i in range(100))  # every copy "takes" a nanosecond
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    with pytest.raises(RuntimeError, match="GB/s is outside"):
        cpu.measure_memory_bandwidth_gbs(nbytes=2**20)


def test_mfu_on_cpu_is_against_a_measured_peak_without_lspci(monkeypatch):
    """torchtitan's MFU divides by its device's peak FLOP/s: an A100's for a CPU (after
    running lspci). On CPU it is this process's measured float32 matmul rate."""
    import torchtitan.tools.utils as tt_utils

    def no_lspci(*args, **kwargs):
        raise AssertionError(f"ran {args[0]}")

    cpu.install_runtime()
    monkeypatch.setattr(subprocess, "run", no_lspci)
    peak = tt_utils.get_peak_flops("NVIDIA A100")  # what the name alone would give: 312e12
    assert peak == tt_utils.get_peak_flops("cpu")  # measured once
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    t0 = time.perf_counter()
    torch.mm(a, b)
    rate = 2 * 512**3 / (time.perf_counter() - t0)
    assert 1e8 < peak < 312e12 and peak > rate / 20, (peak, rate)


def test_benign_warnings_are_silenced_and_others_are_not(one_rank_group):
    """Each known-benign warning, emitted by the code that emits it in a run where one is
    at hand (DTensor's random op on a CPU mesh), or by its text; any other stays."""
    from torch.distributed.tensor import distribute_tensor

    from torchtitan_ext import benign_warnings

    mesh = init_device_mesh("cpu", (1,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        benign_warnings.silence()
        torch.nn.init.normal_(distribute_tensor(torch.empty(4, 4), mesh, [Shard(0)]))
        for category, message, _ in benign_warnings.BENIGN:
            warnings.warn(f"{message} (and the rest of it)", category, stacklevel=1)
        warnings.warn("DTensor random operators are something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["DTensor random operators are something else"]


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_inductor_checks_the_cpu_in_the_machines_cache_folder(device_type, monkeypatch, tmp_path):
    """A compiled start checks the CPU's vector instructions (Inductor's test builds) in the
    machine's Inductor cache folder, which keeps them for later starts, and only then points
    Inductor at the run's own folder; with an accelerator it checks nothing."""
    from torch._inductor import cpu_vec_isa

    from torchtitan_ext.parallelize.compiler import prepare_inductor

    checked_in = []

    def pick_vec_isa():
        checked_in.append(os.environ["TORCHINDUCTOR_CACHE_DIR"])

    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", pick_vec_isa)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "machine"))
    prepare_inductor(
        dump_folder=str(tmp_path / "run"), cache_dir="compile_cache", ac=False,
        device_type=device_type,
    )  # fmt: skip
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "run" / "compile_cache")
    assert checked_in == ([str(tmp_path / "machine")] if device_type == "cpu" else [])
