"""Putting aliased objects back under their names on a live module.

The mechanics ``AliasMap.restore()`` and ``retie()`` (torchtitan_ext.aliases) run on the
module a parallelizer or init returns: look names up and register one object under every
name of a group, re-derive buffer views from their base, give a DTensor back to a name init
assigned a plain tensor, and remember what each name held. The records both modules use
(``AliasGroup``, ``BufferView``, ``AliasError``) are defined here, so that this module does
not import aliases.py. It depends on torch only.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.multiprocessing.reductions import StorageWeakRef

AliasKind = Literal["parameter", "buffer", "module"]

# What each aliased FQN of a module held after its last restore()/retie(): the object's
# id, and a DTensor's (mesh, placements). retie() prefers names whose object init replaced.
# Ids, not weak references: swap_tensors (to_empty on DTensor parameters) refuses tensors
# that have one. An id is not reused while another name of the group still holds the
# object, and init creates a new object before the old one is dropped.
_Seen = tuple[int, tuple[DeviceMesh, tuple[Placement, ...]] | None]
_SNAPSHOTS: weakref.WeakKeyDictionary[nn.Module, dict[str, _Seen]] = weakref.WeakKeyDictionary()


class AliasError(ValueError):
    """Aliased names that cannot be captured, restored or kept consistent."""


@dataclass(frozen=True, slots=True)
class AliasGroup:
    """FQNs that name one object. ``fqns[0]`` is the name ``named_*()`` keeps."""

    kind: AliasKind
    fqns: tuple[str, ...]
    # Buffers only: one flag per FQN (a tensor may be persistent under one name only).
    persistent: tuple[bool, ...] = ()

    @property
    def canonical(self) -> str:
        return self.fqns[0]

    def is_persistent(self, fqn: str) -> bool:
        return self.persistent[self.fqns.index(fqn)] if self.persistent else True

    def __str__(self) -> str:
        text = f"{self.kind} " + " = ".join(self.fqns)
        non_persistent = [f for f in self.fqns if not self.is_persistent(f)]
        if len(non_persistent) == len(self.fqns):
            return f"{text} (non-persistent)"
        return f"{text} (non-persistent: {', '.join(non_persistent)})" if non_persistent else text


@dataclass(frozen=True, slots=True)
class BufferView:
    """Buffer ``fqn`` is a view into the storage of buffer ``base``.

    Geometry is in elements, relative to the base: the view is
    ``base.as_strided(size, stride, base.storage_offset() + offset)``.
    """

    fqn: str
    base: str
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    base_size: tuple[int, ...]
    persistent: bool = True

    def __str__(self) -> str:
        return (
            f"view {self.fqn} = {self.base}.as_strided(size={self.size}, "
            f"stride={self.stride}, offset={self.offset})"
        )


def _relink_views(
    module: nn.Module,
    views: tuple[BufferView, ...],
    group_of: Callable[[str], AliasGroup | None],
    *,
    before: dict[str, _Seen] | None = None,
) -> list[str]:
    """Re-derive every view that no longer shares its base's memory. ``group_of``: the
    group listing an FQN (``AliasMap.group``); ``before``: the snapshot taken before init
    (retie), None for restore."""
    changed: list[str] = []
    for view in views:
        base = _lookup(module, view.base, "buffer")
        if base is None:
            raise AliasError(
                f"buffer {view.base} is missing, so its view {view.fqn} cannot be re-derived"
            )
        if before is not None and base is not (
            kept := _keep_distributed(base, [], [before.get(view.base)])
        ):
            single = AliasGroup("buffer", (view.base,), (_persistent(module, view.base),))
            changed += _tie(module, group_of(view.base) or single, kept)
            base = kept
        current = _lookup(module, view.fqn, "buffer")
        derived = _derive_view(view, base, like=current)
        if current is not None and _same_view(current, derived):
            continue
        if before is not None and current is not None:
            if _holds(before, view.base, base) and not _holds(before, view.fqn, current):
                raise AliasError(
                    f"init assigned buffer {view.fqn} but not its base {view.base}; "
                    f"{view.fqn} is a view of {view.base} and is re-derived from it. "
                    f"Initialize {view.base} instead."
                )
        group = group_of(view.fqn) or AliasGroup("buffer", (view.fqn,), (view.persistent,))
        changed += _tie(module, group, derived)
    return changed


def _snapshot(
    module: nn.Module, groups: tuple[AliasGroup, ...], views: tuple[BufferView, ...]
) -> None:
    """Record what each aliased FQN of ``module`` holds now, for the next retie()."""
    snapshot = _SNAPSHOTS.setdefault(module, {})
    names = [(fqn, g.kind) for g in groups for fqn in g.fqns]
    names += [(fqn, "buffer") for v in views for fqn in (v.fqn, v.base)]
    for fqn, kind in names:
        obj = _lookup(module, fqn, kind)
        if obj is not None:
            layout = (obj.device_mesh, tuple(obj.placements)) if isinstance(obj, DTensor) else None
            snapshot[fqn] = (id(obj), layout)


# ---------------------------------------------------------------------- helpers


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    mod: nn.Module | None = root
    for name in path.split(".") if path else ():
        mod = mod._modules.get(name) if mod is not None else None
    return mod


def _lookup(root: nn.Module, fqn: str, kind: AliasKind) -> Any:
    """The object registered under ``fqn`` as ``kind``, or None."""
    parent_path, _, name = fqn.rpartition(".")
    parent = _submodule(root, parent_path)
    if parent is None:
        return None
    registry = {"parameter": parent._parameters, "buffer": parent._buffers}.get(
        kind, parent._modules
    )
    return registry.get(name)


def _present(root: nn.Module, group: AliasGroup) -> list[tuple[str, Any]]:
    """(FQN, object) for each name of ``group`` registered on ``root``, in group order."""
    found = [(fqn, _lookup(root, fqn, group.kind)) for fqn in group.fqns]
    return [(fqn, obj) for fqn, obj in found if obj is not None]


def _persistent(root: nn.Module, fqn: str) -> bool:
    parent_path, _, name = fqn.rpartition(".")
    parent = _submodule(root, parent_path)
    return parent is not None and name not in parent._non_persistent_buffers_set


def _tie(root: nn.Module, group: AliasGroup, obj: Any) -> list[str]:
    """Register ``obj`` under every FQN of ``group`` that does not hold it already."""
    changed: list[str] = []
    for fqn in group.fqns:
        current = _lookup(root, fqn, group.kind)
        persistent = group.is_persistent(fqn)
        if current is obj and (group.kind != "buffer" or _persistent(root, fqn) == persistent):
            continue
        parent_path, _, name = fqn.rpartition(".")
        parent = _submodule(root, parent_path)
        if parent is None:
            raise AliasError(
                f"cannot register {group.kind} {fqn}: its parent module {parent_path!r} does "
                "not exist on the parallelized module"
            )
        try:
            if group.kind == "parameter":
                parent.register_parameter(name, obj)
            elif group.kind == "buffer":
                parent.register_buffer(name, obj, persistent=persistent)
            else:
                parent.register_module(name, obj)
        except (KeyError, TypeError) as e:
            raise AliasError(f"cannot register {group.kind} {fqn}: {e}") from e
        changed.append(fqn)
    return changed


def _check_compatible(group: AliasGroup, fqn_a: str, a: Any, fqn_b: str, b: Any) -> None:
    """Distinct objects an engine left under two names of one group must be interchangeable."""
    if group.kind == "module":
        same = type(a) is type(b)
        detail = f"{type(a).__name__} vs {type(b).__name__}"
    else:
        detail = f"{_describe(a)} vs {_describe(b)}"
        meshes = [t.device_mesh if isinstance(t, DTensor) else None for t in (a, b)]
        same = _describe(a) == _describe(b) and meshes[0] == meshes[1]
    if not same:
        raise AliasError(
            f"the parallelizer gave {group.kind} {fqn_a} and {fqn_b}, which are one object in "
            f"the model, different layouts ({detail}); one object cannot serve both. "
            "Make the parallelizer give every name of the group the same placement."
        )


def _describe(t: torch.Tensor) -> str:
    desc = f"{tuple(t.shape)} {t.dtype}"
    return f"{desc} {tuple(t.placements)}" if isinstance(t, DTensor) else desc


def _keep_distributed(
    value: torch.Tensor, members: list[torch.Tensor], seen: list[_Seen | None]
) -> torch.Tensor:
    """``value``, or where init assigned a plain tensor over a DTensor, a DTensor like it.

    Written into a DTensor still registered under another name of the group (engines
    such as FSDP hold that object), else distributed as the name was before init.
    """
    if isinstance(value, DTensor):
        return value
    template = next((m for m in members if isinstance(m, DTensor)), None)
    layout = (
        (template.device_mesh, tuple(template.placements))
        if template is not None
        else next((s[1] for s in seen if s is not None and s[1] is not None), None)
    )
    if layout is None:
        return value
    with torch.no_grad():
        # Every rank computed the same full value: take the local shard, no communication.
        src = distribute_tensor(value.detach(), *layout, src_data_rank=None)
        if template is not None:
            template.copy_(src)
            return template
    if isinstance(value, nn.Parameter):
        return nn.Parameter(src, requires_grad=value.requires_grad)
    return src


def _derive_view(view: BufferView, base: torch.Tensor, *, like: Any) -> torch.Tensor:
    """``view`` re-derived from ``base``; a DTensor with ``like``'s placements if it is one."""
    local = _local(base)
    if not local.is_contiguous() or tuple(base.shape) != view.base_size:
        raise AliasError(
            f"buffer {view.base} is {tuple(base.shape)}"
            f"{'' if local.is_contiguous() else ' non-contiguous'}, captured as contiguous "
            f"{view.base_size}: its view {view.fqn} cannot be re-derived. Keep {view.base}'s "
            "shape and layout in init_weights."
        )
    if not isinstance(base, DTensor):
        if isinstance(like, DTensor):
            raise AliasError(
                f"buffer {view.fqn} is a DTensor but its base {view.base} is not; "
                "give both the same kind of tensor"
            )
        return base.as_strided(view.size, view.stride, base.storage_offset() + view.offset)
    if not all(p.is_replicate() for p in base.placements):
        raise AliasError(
            f"buffer {view.fqn} is a view of {view.base}, which is sharded "
            f"({tuple(base.placements)}), so no rank holds the memory {view.fqn} views. "
            f"Keep {view.base} replicated (constrain the parallelizer), or compute "
            f"{view.fqn} from {view.base} in forward instead of registering it."
        )
    mesh = base.device_mesh
    placements = tuple(like.placements) if isinstance(like, DTensor) else tuple(base.placements)
    if isinstance(like, DTensor) and like.device_mesh != mesh:
        raise AliasError(f"buffers {view.fqn} and {view.base} are on different device meshes")
    if any(type(p) not in (Shard, Replicate) for p in placements):
        raise AliasError(
            f"buffer {view.fqn} has placements {placements}; a view can be re-derived "
            "only as Shard or Replicate"
        )
    full = local.as_strided(view.size, view.stride, local.storage_offset() + view.offset)
    shape, offsets = compute_local_shape_and_global_offset(view.size, mesh, placements)
    for dim, (length, start) in enumerate(zip(shape, offsets, strict=True)):
        full = full.narrow(dim, start, length)
    return DTensor.from_local(
        full, mesh, placements, run_check=False, shape=torch.Size(view.size), stride=view.stride
    )


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same memory, same geometry (and same placements for DTensors)."""
    if isinstance(a, DTensor) != isinstance(b, DTensor):
        return False
    if isinstance(a, DTensor) and tuple(a.placements) != tuple(b.placements):
        return False
    la, lb = _local(a), _local(b)
    return (
        StorageWeakRef(la.untyped_storage()) == StorageWeakRef(lb.untyped_storage())
        and la.storage_offset() == lb.storage_offset()
        and la.shape == lb.shape
        and la.stride() == lb.stride()
        and la.dtype == lb.dtype
    )


def _holds(snapshot: dict[str, _Seen], fqn: str, obj: Any) -> bool:
    """Whether ``fqn`` held ``obj`` when the snapshot was taken."""
    seen = snapshot.get(fqn)
    return seen is not None and seen[0] == id(obj)
