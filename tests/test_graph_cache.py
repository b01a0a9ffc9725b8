"""The graph cache (torchtitan_ext/parallelize/graph_cache.py): a warm start rebuilds the
parallel model without AutoParallel, the rebuilt model computes what the traced one does,
and any change to what the graphs depend on misses."""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchtitan.config import ConfigManager

from tests.support.training import REPO_ROOT
from torchtitan_ext.parallelize import graph_cache, graph_cache_entry, plan_model
from torchtitan_ext.parallelize import spec as plan_spec
from torchtitan_ext.parallelize.placements import check_placement_file
from torchtitan_ext.parallelize.spec import PlanSpec, plan_key_of

CONFIG = "llama3_debugmodel_autoparallel"


def parse(*args: str, config: str = CONFIG):
    return ConfigManager().parse_args(["--module", "config_registry", "--config", config, *args])


def one_layer(config):
    config.model_spec.model.layers = config.model_spec.model.layers[:1]
    return config


def start_key(*args: str, edit=None, world_size: int = 2, config: str = CONFIG) -> dict:
    """The graph cache key a start with these flags computes (no tracing)."""
    from torchtitan.distributed import ParallelDims

    config = parse(*args, config=config)
    if edit is not None:
        edit(config)
    config.model_spec.model.update_from_config(config=config)
    with torch.device("meta"):
        model = config.model_spec.model.build()
    dims = ParallelDims.from_config(config.parallelism, world_size)
    spec = PlanSpec.build(
        model,
        config=config.autoparallel,
        parallel_dims=dims,
        training=config.training,
        parallelism=config.parallelism,
        compile_config=config.compile,
        ac_config=config.activation_checkpoint,
        dump_folder="/tmp/dump",
    )
    cache = graph_cache.GraphCache.for_start(
        config=config.autoparallel, spec=spec, dump_folder="/tmp/dump"
    )
    assert cache.folder == "/tmp/dump/graph_cache"
    key = cache.key()
    return key


KEY = {"format": "test", "model": "tiny", "autoparallel": "installed", "rank": 0}


def tiny_entry(key: dict, report=None) -> graph_cache_entry.CacheEntry:
    return graph_cache_entry.CacheEntry(
        key=key, compiled=b"graphs", parameters=[], buffers=[], in_spec=None, out_spec=None,
        input_shapes=[(2, 8)], report=report,
    )  # fmt: skip


class Planted:
    """A payload whose unpickling runs code (creates the folder ``marker``), as a planted
    entry's would."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_an_entry_saved_for_this_key_loads_and_only_this_user_may_touch_it(tmp_path):
    cache = tmp_path / "graph_cache"
    entry = tiny_entry(KEY, report={"plan": "tiny"})
    path = graph_cache.save(str(cache), entry)
    assert graph_cache.load(str(cache), dict(KEY)) == (entry, path)
    assert (mode(cache), mode(os.path.dirname(path)), mode(path)) == (0o700, 0o700, 0o600)
    assert os.listdir(os.path.dirname(path)) == ["rank0.pkl"]  # no temporary file left


def test_an_entry_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails (here: the sync) leaves the entry there before it, and no other
    file."""
    cache = tmp_path / "graph_cache"
    entry = tiny_entry(KEY, report="first")
    path = graph_cache.save(str(cache), entry)

    def fail(fd):
        raise OSError("test: disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        graph_cache.save(str(cache), tiny_entry(KEY, report="second"))
    monkeypatch.undo()
    assert os.listdir(os.path.dirname(path)) == ["rank0.pkl"]
    assert graph_cache.load(str(cache), KEY) == (entry, path)


def _another_owner(monkeypatch, *, regular_files: bool) -> None:
    """Make os.fstat report another owner for regular files (the entry) or, without
    ``regular_files``, make this process another user (folders and entry are then foreign);
    tests run as root, and chown would not make a file foreign to root."""
    if not regular_files:
        uid = os.getuid() + 1
        monkeypatch.setattr(os, "getuid", lambda: uid)
        return
    real_fstat = os.fstat

    def fstat(fd):
        st = real_fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return st
        fields = list(st)
        fields[4] = st.st_uid + 1  # st_uid
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", fstat)


# Each case: what the warning says.
UNUSABLE = {
    "no header": "no graph cache header",
    "another key": "saved for another key (differs in autoparallel)",
    "malformed header": "malformed header (not key, payload_bytes and payload_sha256)",
    "truncated": "truncated",
    "cache folder writable by others": "graph_cache is writable by group or others (mode 777)",
    "folder writable by others": "is writable by group or others (mode 777)",
    "entry writable by others": "the entry file is writable by group or others (mode 666)",
    "folder of another user": "graph_cache is owned by uid",
    "entry of another user": "the entry file is owned by uid",
}


@pytest.mark.parametrize("case", list(UNUSABLE))
def test_a_planted_entry_is_never_unpickled(case, tmp_path, monkeypatch, caplog):
    """An entry file that is not this start's, or that another user could have written, is
    a warning and a miss: its payload (here one that creates a marker) never runs."""
    marker = tmp_path / "marker"
    planted = tiny_entry(KEY, report=Planted(marker))
    pickle.loads(pickle.dumps(planted))  # the plant is live: unpickled, it runs
    assert marker.exists()
    marker.rmdir()

    cache = tmp_path / "graph_cache"
    path = Path(graph_cache.entry_path(str(cache), KEY))
    if case == "another key":
        other = graph_cache.save(str(cache), tiny_entry({**KEY, "autoparallel": "another"},
                                                        report=Planted(marker)))  # fmt: skip
        path.parent.mkdir(mode=0o700)
        os.replace(other, path)
    else:
        graph_cache.save(str(cache), planted)
    if case == "no header":
        path.write_bytes(pickle.dumps(planted))
    elif case == "malformed header":
        path.write_bytes(path.read_bytes().replace(b'"payload_bytes"', b'"payload_bytez"', 1))
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:-1])
    elif case == "cache folder writable by others":
        cache.chmod(0o777)
    elif case == "folder writable by others":
        path.parent.chmod(0o777)
    elif case == "entry writable by others":
        path.chmod(0o666)
    elif case.endswith("of another user"):
        _another_owner(monkeypatch, regular_files=case == "entry of another user")

    with caplog.at_level(logging.WARNING):
        entry, why = graph_cache.load(str(cache), KEY)
    monkeypatch.undo()
    assert entry is None and not marker.exists(), why
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(path) in warnings[0] and UNUSABLE[case] in warnings[0], warnings
    assert "\n" not in warnings[0]


def test_autoparallel_version_is_a_digest_of_the_installed_source(tmp_path, monkeypatch):
    """Not the pinned commit: what is installed (every .py file under the package), read
    once per process."""
    version = plan_spec.autoparallel_version
    package = tmp_path / "site" / "autoparallel"
    (package / "graph_passes").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "graph_passes" / "ac.py").write_text("STAGES = 2\n")
    monkeypatch.delitem(sys.modules, "autoparallel", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    version.cache_clear()
    try:
        installed = version()
        (package / "graph_passes" / "ac.py").write_text("STAGES = 3\n")
        assert version() == installed  # computed once per process
        version.cache_clear()
        edited = version()
        assert edited != installed
        (package / "notes.txt").write_text("not source")
        version.cache_clear()
        assert version() == edited
    finally:
        version.cache_clear()  # the next caller digests the real package


def test_another_autoparallel_misses_the_cache_and_the_placement_file(tmp_path, monkeypatch):
    """Graph cache entries and placement files name the AutoParallel installed when they
    were made: one made by another is not used."""
    from torchtitan.distributed import ParallelDims

    def keys() -> tuple[dict, dict]:
        config = parse()
        plan_key = plan_key_of(config, ParallelDims.from_config(config.parallelism, 2))
        mesh = SimpleNamespace(ndim=1, get_group=lambda axis: SimpleNamespace(group_name="0"))
        cache_key = graph_cache.cache_key(
            plan_key=plan_key, mesh=mesh, options={}, placement_file=""
        )
        return plan_key, cache_key

    cache = str(tmp_path / "graph_cache")
    placements = tmp_path / "placements.json"
    monkeypatch.setattr(plan_spec, "autoparallel_version", lambda: "installed")
    plan_key, cache_key = keys()
    entry = tiny_entry(cache_key)
    graph_cache.save(cache, entry)
    body = {"placements": {}, "torchtitan_ext_parameters": {}}  # no parameter to check
    placements.write_text(json.dumps({"torchtitan_ext_plan_key": plan_key, **body}))
    plan_key, cache_key = keys()  # the same AutoParallel: both are used
    assert graph_cache.load(cache, cache_key)[0] == entry
    check_placement_file(str(placements), plan_key, parameters={})

    monkeypatch.setattr(plan_spec, "autoparallel_version", lambda: "another")
    plan_key, cache_key = keys()
    assert graph_cache.load(cache, cache_key)[0] is None
    with pytest.raises(ValueError, match="solved for autoparallel installed; this run has autop"):
        check_placement_file(str(placements), plan_key, parameters={})


@pytest.mark.engine
def test_every_input_of_the_graphs_changes_the_key(two_fake_ranks, monkeypatch, tmp_path):
    base = start_key()
    assert start_key(edit=one_layer)["model"] != base["model"]
    changes = {
        "batch": ("--training.local_batch_size", "4"),
        "sequence": ("--training.seq_len", "128"),
        "mesh": (
            "--parallelism.data_parallel_replicate_degree", "2",
            "--parallelism.data_parallel_shard_degree", "1",
        ),
        "dtype": ("--training.mixed_precision_param", "bfloat16"),
        "constraints": ("--autoparallel.param_memory_high", "1.0"),
        "bucketing": ("--autoparallel.all_reduce_bucket_mb", "8"),
        "overlap": ("--autoparallel.no-eager-overlap",),
        "compile": ("--compile.enable",),
    }  # fmt: skip
    for what, flags in changes.items():
        key = start_key(*flags)
        differ = sorted(name for name in base if key.get(name) != base[name])
        assert differ, f"a change of {what} ({' '.join(flags)}) left the key as it was"
        assert graph_cache.entry_path("c", key) != graph_cache.entry_path("c", base), what
    # Expert parallelism: the same MoE model planned with and without it.
    moe = "qwen3_moe_debug_autoparallel"
    with_ep = start_key("--parallelism.expert_parallel_degree", "2", config=moe)
    assert with_ep["mesh"] != start_key(config=moe)["mesh"]
    # Engines and this package's source.
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert start_key()["torch"] != base["torch"]
    monkeypatch.undo()
    monkeypatch.setattr(graph_cache, "_package_source_digest", lambda: "edited")
    assert start_key()["torchtitan_ext"] != base["torchtitan_ext"]
    monkeypatch.undo()
    assert base["autoparallel"] == plan_spec.autoparallel_version()  # the installed one
    monkeypatch.setattr(plan_spec, "autoparallel_version", lambda: "edited")
    assert start_key()["autoparallel"] != base["autoparallel"]
    monkeypatch.undo()
    # A placement file: its contents, so an edited file misses.
    placements = tmp_path / "placements.json"
    placements.write_text('{"a": 1}')
    with_file = start_key("--autoparallel.placement_file", str(placements))
    placements.write_text('{"a": 2}')
    edited = start_key("--autoparallel.placement_file", str(placements))
    assert with_file["placements"] != edited["placements"] != base["placements"]
    # Same flags, same key: a warm start finds the entry.
    assert start_key() == base


def count_phases(m: pytest.MonkeyPatch) -> tuple[Counter, list]:
    """Count, until ``m`` is undone, the calls of what a cold start runs: AutoParallel
    built ("autoparallel"), its trace ("trace"), solve ("solve") and apply ("apply"),
    Inductor compiling a graph ("inductor": compile_fx_inner, which compiler.py looks up in
    torch._inductor.compile_fx at each compile), and what a warm start runs instead: the
    graph cache rebuilding the parallel module ("rebuild"), whose results the list holds.
    Each wrapper calls the real function."""
    import torch._inductor.compile_fx as compile_fx
    from autoparallel.api import AutoParallel

    calls: Counter = Counter()
    rebuilt: list = []

    def counted(owner, name: str, phase: str, results: list | None = None) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            calls[phase] += 1
            result = real(*args, **kwargs)
            if results is not None:
                results.append(result)
            return result

        m.setattr(owner, name, wrapper)

    counted(AutoParallel, "__init__", "autoparallel")
    counted(AutoParallel, "build_model_graph", "trace")
    counted(AutoParallel, "optimize_placement", "solve")
    counted(AutoParallel, "apply_placement", "apply")
    counted(compile_fx, "compile_fx_inner", "inductor")
    counted(graph_cache, "build_parallel_module", "rebuild", rebuilt)
    return calls, rebuilt


# What one start runs, eager (a compiled cold start also runs Inductor).
COLD = {"autoparallel": 1, "trace": 1, "solve": 1, "apply": 1}
WARM = {"rebuild": 1}


def refuse_autoparallel(monkeypatch):
    from autoparallel.api import AutoParallel

    def traced(self):
        raise AssertionError("AutoParallel traced although the graph cache has this plan")

    monkeypatch.setattr(AutoParallel, "__enter__", traced)


@pytest.mark.slow  # four plans of the debug model (~50 s)
@pytest.mark.engine
def test_warm_start_rebuilds_the_module_without_autoparallel(
    two_fake_ranks, tmp_path, monkeypatch, caplog
):
    with monkeypatch.context() as m:
        calls, _ = count_phases(m)
        model, cold, _ = plan_model(parse(), world_size=2, dump_folder=str(tmp_path))
    entries = list((tmp_path / "graph_cache").glob("*/rank0.pkl"))
    assert len(entries) == 1, entries
    assert calls == COLD, calls

    plan_json = tmp_path / "autoparallel" / "plan.json"
    plan_json.unlink()  # the cold start's: the one read below is the warm start's
    with monkeypatch.context() as m:
        refuse_autoparallel(m)
        calls, rebuilt = count_phases(m)
        _, warm, _ = plan_model(parse(), world_size=2, dump_folder=str(tmp_path))
    assert calls == WARM, calls
    assert rebuilt[0] is warm  # the module the graph cache rebuilt, not a traced one

    # The warm module itself: each parameter's placements and this rank's shard of it are
    # the cold module's (the plan shards some), and what the warm start's plan.json says
    # of the parameters' placements is what the warm module's parameters have.
    def shards(module):
        return {
            name: (tuple(t.placements), tuple(t.to_local().shape))
            for name, t in module.named_parameters(remove_duplicate=False)
        }

    assert shards(warm) == shards(cold)
    assert any(t.to_local().shape != t.shape for t in cold.parameters())  # some sharded
    plan = json.loads(plan_json.read_text())
    mesh = next(warm.parameters()).device_mesh
    assert plan["mesh"] == dict(zip(mesh.mesh_dim_names, mesh.shape, strict=True))
    live: dict[str, list[str]] = {}
    for name, t in warm.named_parameters():
        placements = zip(mesh.mesh_dim_names, t.placements, strict=True)
        live.setdefault(", ".join(f"{a}={p}" for a, p in placements), []).append(name)
    assert plan["parameters"] == live
    assert type(warm).__mro__[1] is type(model)  # AutoParallel's ParallelModule(model class)

    def tensors(module):
        return {
            name: (type(t), tuple(t.shape), t.dtype, tuple(t.placements), t.requires_grad)
            for name, t in [
                *module.named_parameters(remove_duplicate=False),
                *module.named_buffers(remove_duplicate=False),
            ]
        }

    assert tensors(warm) == tensors(cold)
    assert list(warm.state_dict(keep_vars=True)) == list(cold.state_dict(keep_vars=True))
    assert warm.tok_embeddings.weight is warm.lm_head.weight  # the tied alias, one object

    # The model changed (one layer fewer): a miss, so AutoParallel traces again.
    with monkeypatch.context() as m:
        refuse_autoparallel(m)
        with pytest.raises(AssertionError, match="AutoParallel traced"):
            plan_model(one_layer(parse()), world_size=2, dump_folder=str(tmp_path))
        # The mesh changed (DDP-like instead of FSDP-like on the same 2 ranks): a miss too.
        with pytest.raises(AssertionError, match="AutoParallel traced"):
            plan_model(
                parse(
                    "--parallelism.data_parallel_replicate_degree", "2",
                    "--parallelism.data_parallel_shard_degree", "1",
                ),
                world_size=2,
                dump_folder=str(tmp_path),
            )  # fmt: skip

    # Graphs AOTAutograd cannot serialize: the start trains without an entry.
    import autoparallel.api as ap_api

    compile_joint = ap_api.aot_compile_joint_with_descriptors

    def refuse_serializable(jd, serializable=False, **kwargs):
        if serializable:
            raise RuntimeError("test: not serializable")
        return compile_joint(jd, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ap_api, "aot_compile_joint_with_descriptors", refuse_serializable)
        fresh = tmp_path / "not-serializable"
        _, fallback, _ = plan_model(parse(), world_size=2, dump_folder=str(fresh))
    assert tensors(fallback) == tensors(cold)
    assert not (fresh / "graph_cache").exists()

    # An unusable entry is a warning and a miss (a cold start that saves a good entry), not
    # a failure.
    entries[0].write_bytes(b"not an entry")
    with caplog.at_level(logging.WARNING), monkeypatch.context() as m:
        calls, _ = count_phases(m)
        _, again, _ = plan_model(parse(), world_size=2, dump_folder=str(tmp_path))
    assert calls == COLD, calls
    assert f"graph cache entry {entries[0]} not used: no graph cache header" in caplog.text
    with monkeypatch.context() as m:
        refuse_autoparallel(m)
        calls, rebuilt = count_phases(m)
        _, rewritten, _ = plan_model(parse(), world_size=2, dump_folder=str(tmp_path))
    assert calls == WARM and rebuilt[0] is rewritten, calls


_SAME_STEP = r"""
import sys, pytest, torch, torch.distributed as dist
from torch.distributed.tensor import distribute_tensor
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
import config_registry
from torchtitan.config import ConfigManager
from torchtitan_ext.parallelize import plan_model
from tests.test_graph_cache import COLD, WARM, count_phases
results = []
for start in ("cold", "warm"):
    config = ConfigManager().parse_args(
        ["--module", "config_registry", "--config", sys.argv[1], *sys.argv[3:]])
    # Counted through the step: Inductor may compile the backward at the first backward.
    with pytest.MonkeyPatch.context() as m:
        calls, rebuilt = count_phases(m)
        _, model, component = plan_model(config, world_size=world, dump_folder=sys.argv[2])
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.init_weights(buffer_device=torch.device("cpu"))
            # The same values on every rank and at both starts, without DTensor's RNG.
            g = torch.Generator().manual_seed(0)
            for p in model.parameters():
                full = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02
                p.copy_(distribute_tensor(full, p.device_mesh, p.placements))
        torch.manual_seed(1 + rank)
        batch, seq_len = config.training.local_batch_size, config.training.seq_len
        tokens = torch.randint(0, config.model_spec.model.vocab_size, (batch, seq_len))
        positions = torch.arange(seq_len).repeat(batch, 1)
        logits = model(tokens, positions=positions)
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        with torch.no_grad():
            inference = model(tokens, positions=positions)
    compiled = calls.pop("inductor", 0)
    print(f"CALLS {start} rank {rank}: {dict(calls)}, inductor {compiled}")
    # The mesh's first rank solves; the others receive its placements (placements.py).
    cold = {k: n for k, n in COLD.items() if k != "solve" or rank == 0}
    assert calls == (cold if start == "cold" else WARM), (start, calls)
    assert (compiled > 0) == (start == "cold" and config.compile.enable), (start, compiled)
    results.append((logits.detach(), grads, inference))
(logits, grads, inference), (warm_logits, warm_grads, warm_inference) = results
assert torch.equal(logits, warm_logits)
if config.compile.enable:
    # no_grad runs AutoParallel's inference graph, eager, on a cold start; a warm start
    # runs the cached training forward, Inductor's code.
    torch.testing.assert_close(inference, warm_inference, rtol=1e-5, atol=1e-5)
else:
    assert torch.equal(inference, warm_inference)
worst = max((grads[n] - warm_grads[n]).abs().max().item() for n in grads)
scale = max(g.abs().max().item() for g in grads.values())
print(f"GRADS rank {rank} max |d| {worst:.3g} of max |g| {scale:.3g}")
assert worst <= 1e-6 * scale, (worst, scale)
"""

_EP = ("--parallelism.expert_parallel_degree", "2")


@pytest.mark.slow  # two starts and a step in fresh processes (25-120 s)
@pytest.mark.engine
@pytest.mark.parametrize(
    "config, flags, ranks",
    [
        (CONFIG, (), 1),
        ("llama3_debugmodel_shared_rope_autoparallel", (), 1),
        # Inductor compiles at the cold start (~25 s); the warm one loads its code.
        (CONFIG, ("--compile.enable", "--training.seq_len", "64"), 1),
        # Expert parallelism on 2 ranks: the tokens each rank's experts receive are sized by
        # the routing at each step (unbacked sizes in the cached graphs).
        ("qwen3_moe_debug_autoparallel", _EP, 2),
        ("qwen3_moe_debug_autoparallel", (*_EP, "--compile.enable", "--training.seq_len", "64"), 2),
    ],
    ids=["eager", "shared_rope", "compiled", "expert_parallel", "expert_parallel_compiled"],
)
def test_warm_module_computes_what_the_cold_one_does(config, flags, ranks, tmp_path):
    """Logits equal bit for bit; gradients to 1e-6 of their size (the backward's CPU
    reductions are not bitwise deterministic run to run, cold or warm: ~3e-11 here), on
    every rank. Compiled: the warm start neither traces nor compiles."""
    script = tmp_path / "same_step.py"
    script.write_text(_SAME_STEP)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc-per-node", str(ranks), str(script), config, str(tmp_path / "dump"), *flags],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rank in range(ranks):
        assert f"GRADS rank {rank}" in proc.stdout, proc.stdout[-2000:]
        assert f"CALLS warm rank {rank}: {{'rebuild': 1}}, inductor 0" in proc.stdout
