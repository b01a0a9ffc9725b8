"""The graph cache (torchtitan_ext/graph_cache.py): a warm start rebuilds the parallel model
without AutoParallel, the rebuilt model computes what the traced one does, and any change
to what the graphs depend on misses."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
from torchtitan.config import ConfigManager

from tests._training import REPO_ROOT
from torchtitan_ext import graph_cache
from torchtitan_ext.auto_parallel import plan_model

CONFIG = "llama3_debugmodel_autoparallel"


def parse(*args: str):
    return ConfigManager().parse_args(["--module", "config_registry", "--config", CONFIG, *args])


def one_layer(config):
    config.model_spec.model.layers = config.model_spec.model.layers[:1]
    return config


def start_key(*args: str, edit=None, world_size: int = 2) -> dict:
    """The graph cache key a start with these flags computes (no tracing)."""
    from torchtitan.distributed import ParallelDims

    config = parse(*args)
    if edit is not None:
        edit(config)
    config.model_spec.model.update_from_config(config=config)
    with torch.device("meta"):
        model = config.model_spec.model.build()
    component = config.autoparallel.build()
    dims = ParallelDims.from_config(config.parallelism, world_size)
    spec = component._plan_spec(model, dims, config.training, config.parallelism, "/tmp/dump")
    cache_dir, key = component._graph_cache_key(
        spec,
        "/tmp/dump",
        usable=True,
        compile_model=config.compile.enable and "model" in config.compile.components,
        ac=config.activation_checkpoint is not None,
    )
    assert cache_dir == "/tmp/dump/graph_cache"
    return key


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
    # Engines and this package's source.
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert start_key()["torch"] != base["torch"]
    monkeypatch.undo()
    monkeypatch.setattr(graph_cache, "_package_source_digest", lambda: "edited")
    assert start_key()["torchtitan_ext"] != base["torchtitan_ext"]
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


def refuse_autoparallel(monkeypatch):
    from autoparallel.api import AutoParallel

    def traced(self):
        raise AssertionError("AutoParallel traced although the graph cache has this plan")

    monkeypatch.setattr(AutoParallel, "__enter__", traced)


@pytest.mark.slow  # four plans of the debug model (~50 s)
@pytest.mark.engine
def test_warm_start_rebuilds_the_module_without_autoparallel(two_fake_ranks, tmp_path, monkeypatch):
    model, cold, cold_component = plan_model(parse(), world_size=2, dump_folder=str(tmp_path))
    entries = list((tmp_path / "graph_cache").glob("*/rank0.pkl"))
    assert len(entries) == 1, entries
    assert cold_component.times.trace > 0 and cold_component.times.graph_cache_load == 0

    with monkeypatch.context() as m:
        refuse_autoparallel(m)
        _, warm, warm_component = plan_model(parse(), world_size=2, dump_folder=str(tmp_path))
    times = warm_component.times
    assert times.trace == times.solve == times.apply == 0 and times.graph_cache_load > 0
    assert warm_component.report == cold_component.report
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

    # An unreadable entry is a miss (a cold start that saves a good entry), not a failure.
    entries[0].write_bytes(b"not a pickle")
    _, again, again_component = plan_model(parse(), world_size=2, dump_folder=str(tmp_path))
    assert again_component.times.trace > 0
    assert isinstance(pickle.loads(entries[0].read_bytes()), graph_cache.CacheEntry)


_SAME_STEP = r"""
import os, sys, tempfile, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
import config_registry
from torchtitan.config import ConfigManager
from torchtitan_ext.auto_parallel import plan_model
results = []
for start in ("cold", "warm"):
    config = ConfigManager().parse_args(
        ["--module", "config_registry", "--config", sys.argv[1], *sys.argv[4:]])
    _, model, component = plan_model(config, world_size=1, dump_folder=sys.argv[3])
    assert (component.times.trace > 0) == (start == "cold"), (start, component.times)
    assert (component.times.compile > 0) == (start == "cold" and config.compile.enable)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    torch.manual_seed(1)
    tokens = torch.randint(0, config.model_spec.model.vocab_size, (8, config.training.seq_len))
    positions = torch.arange(config.training.seq_len).repeat(8, 1)
    logits = model(tokens, positions=positions)
    logits.float().pow(2).mean().backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    with torch.no_grad():
        inference = model(tokens, positions=positions)
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
print(f"GRADS max |d| {worst:.3g} of max |g| {scale:.3g}")
assert worst <= 1e-6 * scale, (worst, scale)
"""


@pytest.mark.slow  # two starts and a step in a fresh process (~25 s)
@pytest.mark.engine
@pytest.mark.parametrize(
    "config, flags",
    [
        (CONFIG, ()),
        ("llama3_debugmodel_shared_rope_autoparallel", ()),
        # Inductor compiles at the cold start (~25 s); the warm one loads its code.
        (CONFIG, ("--compile.enable", "--training.seq_len", "64")),
    ],
    ids=["eager", "shared_rope", "compiled"],
)
def test_warm_module_computes_what_the_cold_one_does(config, flags, tmp_path):
    """Logits equal bit for bit; gradients to 1e-6 of their size (the backward's CPU
    reductions are not bitwise deterministic run to run, cold or warm: ~3e-11 here).
    Compiled: the warm start neither traces nor compiles."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-c", _SAME_STEP, config, str(port), str(tmp_path), *flags],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "GRADS" in proc.stdout
