"""torchtitan_ext.aliases: capture, restore, keep tied and verify aliased names.

Each model of ``alias_models`` goes through real transforms that break aliasing (meta
round trip, ``distribute_module``, FSDP2, AutoParallel), then restore + keep_tied + init +
verify, and must match the plain model: same FQNs and state_dict keys, one storage per
group, same loss and gradients.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor

from tests.support import alias_engines as engines
from tests.support.alias_models import MODELS, SharedBuffers, TiedLM, ViewBuffers
from torchtitan_ext.aliases import AliasError, AliasGroup, AliasMap, unique_storage_bytes


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A real 1-rank gloo process group and CPU mesh, in this process."""
    with engines.process_group("gloo", init_file=str(tmp_path / "store")):
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))


@pytest.fixture
def autoparallel_on_cpu(monkeypatch):
    monkeypatch.setenv("TORCHTITAN_EXT_DEVICE", "cpu")  # the meshes here are CPU meshes


# ---------------------------------------------------------------------- capture


@pytest.mark.parametrize(
    "name, expected",
    [
        ("tied", ["parameter tok_embeddings.weight = lm_head.weight"]),
        (
            "shared_buffers",
            ["buffer layers.0.freqs = layers.1.freqs = rope.cache (non-persistent: rope.cache)"],
        ),
        ("aliased_block", ["module block = mirror"]),
        ("view", ["view head = table.as_strided(size=(8, 16), stride=(16, 1), offset=0)"]),
    ],
)
def test_capture(name, expected):
    for device in ("cpu", "meta"):
        with torch.device(device):
            model = MODELS[name]()
        alias_map = AliasMap.capture(model)
        assert str(alias_map).splitlines()[1:] == [f"  {line}" for line in expected]
        assert alias_map and len(alias_map) == 1
        assert alias_map == AliasMap.capture(model)  # deterministic, comparable, hashable
        assert hash(alias_map) == hash(AliasMap.capture(model))
    with pytest.raises(dataclasses.FrozenInstanceError):
        alias_map.groups = ()


def test_capture_persistence_and_canonical_name():
    (group,) = AliasMap.capture(SharedBuffers()).groups
    assert group.canonical == "layers.0.freqs"  # the name named_buffers() keeps
    assert group.persistent == (True, True, False)
    assert group.is_persistent("layers.1.freqs") and not group.is_persistent("rope.cache")


def test_no_aliases():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    alias_map = AliasMap.capture(model)
    assert not alias_map and len(alias_map) == 0
    assert str(alias_map) == "AliasMap: no aliases"
    assert alias_map.restore(model) == [] and alias_map.retie(model) == []
    alias_map.verify(model)


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.register_buffer("x", torch.zeros(4))
        self.c = nn.Module()
        self.c.register_buffer("y", self.x, persistent=False)


class _Nested(nn.Module):
    """Aliases inside an aliased submodule: every inner name also appears under ``mirror``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Inner()
        self.mirror = self.inner


def test_nested_aliases_are_implied_by_the_module_alias():
    model = _Nested()
    alias_map = AliasMap.capture(model)
    assert [str(g) for g in alias_map.groups] == [
        "module inner = mirror",
        "parameter inner.a.weight = inner.b.weight",
        "buffer inner.x = inner.c.y (non-persistent: inner.c.y)",
    ]
    # an engine that kept only "inner", with its own tied weight split
    parallel = copy.deepcopy(model)
    del parallel._modules["mirror"]
    parallel.inner.b.weight = nn.Parameter(parallel.inner.a.weight.detach().clone())
    restored = alias_map.restore(parallel)
    assert restored == ["mirror", "inner.b.weight"]  # mirror.* come back with the module
    names = [n for n, _ in parallel.named_parameters(remove_duplicate=False)]
    assert names == [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert sorted(parallel.state_dict()) == sorted(model.state_dict())
    assert parallel.mirror.b.weight is parallel.inner.a.weight
    alias_map.verify(parallel)


class _ParamAsBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("w", self.proj.weight)


def test_capture_refuses_parameter_registered_as_buffer():
    with pytest.raises(AliasError, match="Register the tensor as a parameter only") as e:
        AliasMap.capture(_ParamAsBuffer())
    assert str(e.value).startswith("parameter proj.weight is also registered as buffer w;")


def test_capture_refuses_shape_disagreement():
    model = nn.Module()
    model.register_buffer("a", torch.zeros(4, 8))
    model.register_buffer("b", model.a.view(32))
    with pytest.raises(AliasError, match=r"a \(4, 8\) and b \(32,\) .* different shapes"):
        AliasMap.capture(model)


def test_capture_refuses_parameter_sharing_storage():
    model = nn.Linear(4, 4)
    model.register_buffer("rows", model.weight.detach()[:2])
    with pytest.raises(AliasError, match="parameter weight, buffer rows share one storage"):
        AliasMap.capture(model)


def test_capture_refuses_views_without_a_registered_base():
    model = nn.Module()
    whole = torch.zeros(8)
    model.register_buffer("lo", whole[:4])
    model.register_buffer("hi", whole[4:])
    with pytest.raises(AliasError, match="none of them is a contiguous tensor covering"):
        AliasMap.capture(model)


# ---------------------------------------------------------------------- restore / retie


@pytest.mark.parametrize("drop", ["canonical", "alias"])
@pytest.mark.parametrize("name", ["tied", "shared_buffers", "aliased_block"])
def test_restore_from_whichever_name_survived(name, drop):
    model = MODELS[name]()
    alias_map = AliasMap.capture(model)
    (group,) = alias_map.groups
    parallel = copy.deepcopy(model)
    dropped = group.fqns[0] if drop == "canonical" else group.fqns[-1]
    parent, _, attr = dropped.rpartition(".")
    owner = parallel.get_submodule(parent)
    survivor = _registered(parallel, group.fqns[-1 if drop == "canonical" else 0], group.kind)
    for registry in (owner._parameters, owner._buffers, owner._modules):
        registry.pop(attr, None)
    with pytest.raises(AliasError, match=f"missing {group.kind} {dropped}"):
        alias_map.verify(parallel)

    assert alias_map.restore(parallel) == [dropped]
    assert all(_registered(parallel, f, group.kind) is survivor for f in group.fqns)
    assert engines.fqn_lists(parallel) == engines.fqn_lists(model)
    assert sorted(parallel.state_dict()) == sorted(model.state_dict())
    alias_map.verify(parallel)
    assert alias_map.restore(parallel) == []  # idempotent


def _registered(model: nn.Module, fqn: str, kind: str):
    if kind == "module":
        return model.get_submodule(fqn)
    return model.get_parameter(fqn) if kind == "parameter" else model.get_buffer(fqn)


def test_restore_fixes_persistence():
    model = SharedBuffers()
    alias_map = AliasMap.capture(model)
    model.rope.register_buffer("cache", model.rope.cache, persistent=True)
    with pytest.raises(AliasError, match="persistence changed: buffer rope.cache"):
        alias_map.verify(model)
    assert alias_map.restore(model) == ["rope.cache"]
    assert "rope.cache" not in model.state_dict()
    alias_map.verify(model)


@pytest.mark.parametrize("name", MODELS)
def test_meta_round_trip(name):
    """deepcopy, .to("meta") (splits every alias), to_empty + init_weights."""
    engines.run_meta_roundtrip(MODELS[name])


def test_tied_gradient_accumulates_from_both_uses():
    engines.check_tied_gradient_accumulates(TiedLM.sample())


def test_retie_prefers_the_name_init_replaced():
    model = SharedBuffers()
    alias_map = AliasMap.capture(model)
    alias_map.restore(model)
    old = model.rope.cache
    new_b, new_c = torch.ones(8, 16), torch.full((8, 16), 2.0)
    model.rope.cache = new_c  # last name in group order, replaced
    assert alias_map.retie(model) == ["layers.0.freqs", "layers.1.freqs"]
    assert all(model.get_buffer(f) is new_c for f in alias_map.groups[0].fqns)
    assert old is not new_c
    model.layers[1].freqs, model.rope.cache = new_b, torch.zeros(8, 16)
    alias_map.retie(model)  # two replaced names: the first in group order wins
    assert all(model.get_buffer(f) is new_b for f in alias_map.groups[0].fqns)
    assert "rope.cache" not in model.state_dict()  # persistence kept per name


def test_retie_rederives_views_and_refuses_initializing_only_the_view():
    model = ViewBuffers()
    alias_map = AliasMap.capture(model)
    alias_map.restore(model)
    model.table = torch.full((16, 16), 3.0)
    assert alias_map.retie(model) == ["head"]
    assert model.head.untyped_storage().data_ptr() == model.table.untyped_storage().data_ptr()
    assert torch.equal(model.head, torch.full((8, 16), 3.0))
    model.table.mul_(2)  # writes through either name are visible through both
    assert torch.equal(model.head, torch.full((8, 16), 6.0))
    model.head = torch.zeros(8, 16)
    with pytest.raises(AliasError, match="init assigned buffer head but not its base table"):
        alias_map.retie(model)


def test_keep_tied_is_transparent_and_idempotent():
    class Model(TiedLM):
        def init_weights(self, scale: float = 1.0, *, note: str = "") -> str:
            self.init_states()
            with torch.no_grad():
                self.lm_head.weight.mul_(scale)
            return f"done{note}"

        def init_states(self) -> None:
            super().init_weights()
            self.lm_head.weight = nn.Parameter(self.lm_head.weight.detach() + 1)  # unties

    model = Model()
    original = inspect.signature(model.init_weights)
    alias_map = AliasMap.capture(model)
    alias_map.keep_tied(model)
    alias_map.keep_tied(model)
    assert inspect.signature(model.init_weights) == original
    assert model.init_weights.__wrapped__.__func__ is Model.init_weights  # wrapped once
    assert model.init_weights(2.0, note="!") == "done!"
    assert model.tok_embeddings.weight is model.lm_head.weight
    # init_states ran nested (no retie in between): the replaced lm_head.weight won
    expected = (TiedLM.expected_init()["lm_head.weight"] + 1) * 2
    torch.testing.assert_close(model.tok_embeddings.weight.detach(), expected)
    alias_map.verify(model)


def test_verify_names_the_untied_fqns():
    model = TiedLM()
    alias_map = AliasMap.capture(model)
    alias_map.verify(model)
    model.lm_head.weight = nn.Parameter(torch.zeros(32, 16))  # deliberately untied
    with pytest.raises(AliasError) as e:
        alias_map.verify(model)
    message = str(e.value)
    assert "split parameter: tok_embeddings.weight, lm_head.weight are 2 different" in message
    assert "2 storage(s)" in message and message.isascii()


def test_verify_reports_every_problem():
    model = SharedBuffers()
    view_model = ViewBuffers()
    alias_map = AliasMap(
        groups=AliasMap.capture(model).groups, views=AliasMap.capture(view_model).views
    )
    model.register_buffer("table", view_model.table, persistent=False)
    model.register_buffer("head", view_model.table[:8].clone())  # not a view any more
    del model.layers[1]._buffers["freqs"]
    model.rope.register_buffer("cache", torch.zeros(8, 16), persistent=True)
    with pytest.raises(AliasError) as e:
        alias_map.verify(model)
    problems = str(e.value).splitlines()[1:-1]
    assert problems == [
        "  - missing buffer layers.1.freqs",
        "  - split buffer: layers.0.freqs, rope.cache are 2 different objects in 2 storage(s);"
        " they must be one",
        "  - persistence changed: buffer rope.cache was non-persistent",
        "  - view inconsistent: buffer head no longer shares the storage of table "
        "(view head = table.as_strided(size=(8, 16), stride=(16, 1), offset=0))",
    ]


def test_unique_storage_bytes():
    model = TiedLM()
    assert unique_storage_bytes(model) == 4 * (32 * 16 + 16 * 16 + 16)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    assert unique_storage_bytes(model) == 4 * (2 * 32 * 16 + 16 * 16 + 16)
    view = ViewBuffers()
    assert unique_storage_bytes(view) == 4 * (16 * 16 + 16 + 16 * 16)


def test_group_lookup():
    alias_map = AliasMap.capture(TiedLM())
    assert alias_map.group("lm_head.weight") == AliasGroup(
        "parameter", ("tok_embeddings.weight", "lm_head.weight")
    )
    assert alias_map.group("proj.weight") is None


# ---------------------------------------------------------------------- distributed, 1 rank


@pytest.mark.parametrize("name", MODELS)
def test_distribute_module(name, one_rank_mesh):
    engines.run_distribute_module(MODELS[name], one_rank_mesh)


@pytest.mark.parametrize("name", MODELS)
def test_fsdp2_one_rank(name, one_rank_mesh):
    engines.run_fsdp2(MODELS[name], one_rank_mesh)


def test_restore_refuses_names_placed_differently(one_rank_mesh):
    model = TiedLM()
    alias_map = AliasMap.capture(model)

    def shard_lm_head(name, module, mesh):
        for key, param in list(module.named_parameters(recurse=False)):
            placement = Shard(0) if name == "lm_head" else Replicate()
            dtensor = distribute_tensor(param.detach(), mesh, [placement])
            module.register_parameter(key, nn.Parameter(dtensor))

    parallel = distribute_module(model, one_rank_mesh, shard_lm_head)
    with pytest.raises(AliasError, match="tok_embeddings.weight and lm_head.weight") as e:
        alias_map.restore(parallel)
    assert "(Replicate(),) vs (32, 16) torch.float32 (Shard(dim=0),)" in str(e.value)


def test_view_of_a_sharded_base_is_refused(one_rank_mesh):
    model = ViewBuffers()
    alias_map = AliasMap.capture(model)

    def shard_table(name, module, mesh):
        for key, buf in list(module.named_buffers(recurse=False)):
            placement = Shard(0) if key == "table" else Replicate()
            module.register_buffer(key, distribute_tensor(buf, mesh, [placement]))

    parallel = distribute_module(model, one_rank_mesh, shard_table)
    with pytest.raises(AliasError, match="view of table, which is sharded") as e:
        alias_map.restore(parallel)
    assert "Keep table replicated" in str(e.value)


def test_dtensor_stays_dtensor_when_init_assigns_a_plain_tensor(one_rank_mesh):
    model = SharedBuffers()
    alias_map = AliasMap.capture(model)
    parallel = distribute_module(model, one_rank_mesh)
    alias_map.restore(parallel)
    parallel.rope.cache = torch.ones(8, 16)
    alias_map.retie(parallel)
    cache = parallel.rope.cache
    assert isinstance(cache, DTensor) and cache.placements == (Replicate(),)
    assert all(parallel.get_buffer(f) is cache for f in alias_map.groups[0].fqns)
    assert torch.equal(cache.full_tensor(), torch.ones(8, 16))


# ---------------------------------------------------------------------- AutoParallel


@pytest.mark.engine
@pytest.mark.parametrize("name", MODELS)
def test_autoparallel(name, one_rank_mesh, autoparallel_on_cpu):
    engines.run_autoparallel(MODELS[name], one_rank_mesh)


@pytest.mark.engine
def test_autoparallel_module_missing_an_alias(one_rank_mesh, autoparallel_on_cpu):
    """Older AutoParallel commits do not re-register aliases: restore does."""
    with torch.device("meta"):
        model = TiedLM()
    parallel, alias_map = engines.autoparallel(model, one_rank_mesh, TiedLM.sample())
    assert alias_map.restore(parallel) == []  # a54c252 re-registers tied weights itself
    kept = parallel.lm_head.weight
    del parallel.tok_embeddings._parameters["weight"]
    assert alias_map.restore(parallel) == ["tok_embeddings.weight"]
    assert parallel.tok_embeddings.weight is kept
    alias_map.verify(parallel)


@pytest.mark.engine
def test_autoparallel_refuses_parameter_as_buffer_before_tracing(autoparallel_on_cpu):
    # AutoParallel itself crashes in move_to_fake ("dictionary changed size during iteration")
    with pytest.raises(AliasError, match="Register the tensor as a parameter only"):
        engines.autoparallel(_ParamAsBuffer(), mesh=None, sample=torch.zeros(4, 4))


@pytest.mark.engine
@pytest.mark.parametrize(
    "mesh_shape",
    [(4,), pytest.param((2, 2), marks=pytest.mark.slow)],  # 2d: a 15 s solve
    ids=["1d", "2d"],
)
def test_autoparallel_gives_a_group_one_placement(mesh_shape, autoparallel_on_cpu):
    """Alias names are separate graph inputs: unconstrained, the solver shards the unused
    one and the module then feeds that placement to the used one (forward fails with a
    size mismatch). Paired, they agree. Fake process group (world 4): tracing, solving
    and shapes only, no numerics."""
    with engines.process_group("fake", world_size=4):
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "tp")[: len(mesh_shape)])
        with torch.device("meta"):
            model = SharedBuffers()
        parallel, alias_map = engines.autoparallel(model, mesh, SharedBuffers.sample(batch=2))
        alias_map.restore(parallel)
        alias_map.keep_tied(parallel)
        parallel.to_empty(device="cpu")
        parallel.init_weights()
        alias_map.verify(parallel)
        placements = {parallel.get_buffer(f).placements for f in alias_map.groups[0].fqns}
        assert len(placements) == 1
        assert parallel(SharedBuffers.sample(batch=2)).shape == (2, 8, 16)


# ---------------------------------------------------------------------- two ranks


@pytest.mark.slow
def test_two_ranks_fsdp2_and_distribute_module(tmp_path):
    transforms = ["fsdp2", "distribute_module"]
    mp.spawn(engines.two_rank_worker, args=(2, str(tmp_path / "store"), transforms), nprocs=2)


@pytest.mark.slow
@pytest.mark.engine
def test_two_ranks_autoparallel(tmp_path):
    """AutoParallel's own (replicated) plan for every toy, and an FSDP-like plan for the
    tied and shared-buffer toys: names, one object per group, values, loss and gradients
    against the plain model, gathered from the shards."""
    transforms = ["autoparallel", "autoparallel_sharded"]
    mp.spawn(engines.two_rank_worker, args=(2, str(tmp_path / "store"), transforms), nprocs=2)
