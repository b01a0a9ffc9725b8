"""Aliased parameters, buffers and submodules: capture them, restore them, keep them tied.

A model may register one object under several names: tied weights
(``tok_embeddings.weight = lm_head.weight``), one RoPE cache registered in many modules,
one submodule reachable under two names. ``named_parameters()``, ``named_buffers()`` and
``named_modules()`` deduplicate by default, and parallelizers (tracing, fake tensors,
deepcopy, ``to_empty``, ``distribute_module``) drop the extra names or split them into
separate tensors. This module records the aliasing of the original model and re-creates it
on whatever module the parallelizer returns. It depends on torch only.

Usage::

    aliases = AliasMap.capture(model)  # before parallelizing; refuses unsupported sharing
    model = parallelize(model)
    aliases.restore(model)  # re-register the names the engine dropped or split
    aliases.keep_tied(model)  # init_weights/init_states leave every group tied
    model.to_empty(device=device)
    model.init_weights()
    aliases.verify(model)  # AliasError naming the FQNs if anything is off
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = [
    "AliasError",
    "AliasGroup",
    "AliasKind",
    "AliasMap",
    "BufferView",
    "unique_storage_bytes",
]

AliasKind = Literal["parameter", "buffer", "module"]
# Modules first: restoring module "a" re-creates every name below it.
_KINDS: tuple[AliasKind, ...] = ("module", "parameter", "buffer")

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


@dataclass(frozen=True, slots=True)
class AliasMap:
    """The aliasing of a module: groups of FQNs naming one object, and buffer views.

    Holds names and geometry only (no tensors), so it is cheap to keep and to log.
    Names reachable only through an aliased submodule (``mirror.weight`` when
    ``mirror is block``) are implied by the module group and not listed again.
    """

    groups: tuple[AliasGroup, ...] = ()
    views: tuple[BufferView, ...] = ()

    # ------------------------------------------------------------------ capture

    @classmethod
    def capture(cls, module: nn.Module) -> AliasMap:
        """Record every aliased parameter, buffer and submodule of ``module``.

        Raises ``AliasError`` for sharing no parallelizer can keep: a tensor registered
        as both parameter and buffer, parameters overlapping other tensors' storage, and
        buffers on one storage that disagree in shape or have no base covering them.
        """
        paths = dict(module.named_modules(remove_duplicate=False))
        first_path: dict[int, str] = {}
        for path, mod in paths.items():
            first_path.setdefault(id(mod), path)

        def canonical(fqn: str) -> str:
            # Rewrite the owner's path to its first path, so that names reached only
            # through an aliased submodule collapse onto the names under the original.
            parent, _, name = fqn.rpartition(".")
            owner = first_path[id(paths[parent])]
            return f"{owner}.{name}" if owner else name

        objects: dict[AliasKind, dict[int, tuple[Any, list[str]]]] = {k: {} for k in _KINDS}
        for path, mod in paths.items():
            if path:
                objects["module"].setdefault(id(mod), (mod, []))[1].append(path)
        for fqn, param in module.named_parameters(remove_duplicate=False):
            objects["parameter"].setdefault(id(param), (param, []))[1].append(fqn)
        for fqn, buf in module.named_buffers(remove_duplicate=False):
            objects["buffer"].setdefault(id(buf), (buf, []))[1].append(fqn)

        for both in objects["parameter"].keys() & objects["buffer"].keys():
            params, buffers = (", ".join(objects[k][both][1]) for k in ("parameter", "buffer"))
            raise AliasError(
                f"parameter {params} is also registered as buffer {buffers}; no parallelizer "
                "can keep one tensor as both. Register the tensor as a parameter only and read "
                "it through the parameter name (or register a .clone() as the buffer if it "
                "must not follow the parameter)."
            )

        def persistent(fqn: str) -> bool:
            parent, _, name = fqn.rpartition(".")
            return name not in paths[parent]._non_persistent_buffers_set

        groups: list[AliasGroup] = []
        # tensor -> (kind, canonical FQN) of each distinct tensor, for the storage check
        tensors: list[tuple[AliasKind, str, torch.Tensor]] = []
        for kind in _KINDS:
            for obj, fqns in objects[kind].values():
                names = list(dict.fromkeys(canonical(fqn) for fqn in fqns))
                if kind != "module":
                    tensors.append((kind, names[0], obj))
                if len(names) > 1:
                    flags = tuple(persistent(n) for n in names) if kind == "buffer" else ()
                    groups.append(AliasGroup(kind, tuple(names), flags))
        groups.sort(key=lambda g: (_KINDS.index(g.kind), g.canonical.count(".")))
        views = _capture_views(tensors, persistent)
        return cls(groups=tuple(groups), views=views)

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self.groups) + len(self.views)

    def __str__(self) -> str:
        if not self:
            return "AliasMap: no aliases"
        lines = [f"AliasMap: {len(self.groups)} alias group(s), {len(self.views)} view(s)"]
        lines += [f"  {item}" for item in (*self.groups, *self.views)]
        return "\n".join(lines)

    def group(self, fqn: str) -> AliasGroup | None:
        """The group that lists ``fqn``, if any (for engines that must treat a group as one)."""
        return next((g for g in self.groups if fqn in g.fqns), None)

    # ------------------------------------------------------------------ restore / retie

    def restore(self, module: nn.Module) -> list[str]:
        """Re-register every name of each group onto the object a surviving name holds.

        For the module a parallelizer returns. The first name of a group that is present
        wins; names the engine split into distinct but compatible objects are pointed at
        it (never a copy). Views are re-derived from their base. Returns the FQNs
        (re-)registered; ``[]`` when the engine kept everything.
        """
        changed: list[str] = []
        for group in self.groups:
            present = _present(module, group)
            if not present:
                raise AliasError(
                    f"{group}: none of these names exists on the parallelized module, "
                    "so there is nothing to restore them from."
                )
            winner_fqn, winner = present[0]
            for fqn, obj in present[1:]:
                if obj is not winner:
                    _check_compatible(group, winner_fqn, winner, fqn, obj)
            changed += _tie(module, group, winner)
        changed += self._relink_views(module)
        self._snapshot(module)
        return changed

    def retie(self, module: nn.Module) -> list[str]:
        """After init: point every name of each group at one object again.

        A name whose object init replaced wins over one it did not (the old object holds
        uninitialized memory after ``to_empty``); among several, the first in group order.
        DTensors stay DTensors: a plain tensor init assigned over one is distributed like
        it. Views are re-derived from their base. Returns the FQNs re-pointed.
        """
        before = _SNAPSHOTS.get(module, {})
        changed: list[str] = []
        for group in self.groups:
            present = _present(module, group)
            if not present:
                raise AliasError(f"{group}: init removed every name of this group.")
            replaced = [obj for fqn, obj in present if not _holds(before, fqn, obj)]
            winner = replaced[0] if replaced else present[0][1]
            if group.kind != "module":
                seen = [before.get(fqn) for fqn in group.fqns]
                winner = _keep_distributed(winner, [obj for _, obj in present], seen)
            changed += _tie(module, group, winner)
        changed += self._relink_views(module, before=before)
        self._snapshot(module)
        return changed

    def keep_tied(self, module: nn.Module) -> None:
        """Wrap ``module.init_weights`` (and ``init_states``) so groups stay tied.

        The wrapper ties every group before the user's init (``to_empty`` splits aliased
        buffers, and in-place init must write through every name) and again after it
        (init may assign a new tensor to one name). Transparent: same signature, same
        return value. Idempotent for one map; nested calls (init_weights calling
        init_states) retie once, around the outermost call.
        """
        depth = [0]  # shared by both wrappers: init_weights may call init_states
        for name in ("init_weights", "init_states"):
            original = getattr(module, name, None)
            if callable(original) and not _wrapped_by(original, self):
                # An instance attribute shadows the method, as engines' own wrappers do.
                setattr(module, name, self._tied_init(module, original, depth))

    # ------------------------------------------------------------------ verify

    def verify(self, module: nn.Module) -> None:
        """Raise ``AliasError`` naming every FQN that is missing, split into several
        objects, registered with another persistence, or no longer a view of its base."""
        problems: list[str] = []
        for group in self.groups:
            objs = {fqn: _lookup(module, fqn, group.kind) for fqn in group.fqns}
            missing = [fqn for fqn, obj in objs.items() if obj is None]
            for fqn in missing:
                other = [
                    k for k in _KINDS if k != group.kind and _lookup(module, fqn, k) is not None
                ]
                found = f" (registered as a {other[0]} instead)" if other else ""
                problems.append(f"missing {group.kind} {fqn}{found}")
            distinct = {id(o): o for o in objs.values() if o is not None}
            if len(distinct) > 1:
                storages = ""
                if group.kind != "module":
                    keys = {StorageWeakRef(_local(o).untyped_storage()) for o in distinct.values()}
                    storages = f" in {len(keys)} storage(s)"
                present = ", ".join(f for f, o in objs.items() if o is not None)
                problems.append(
                    f"split {group.kind}: {present} are {len(distinct)} different "
                    f"objects{storages}; they must be one"
                )
            if group.kind == "buffer":
                for fqn in group.fqns:
                    if objs[fqn] is not None and _persistent(module, fqn) != (
                        expected := group.is_persistent(fqn)
                    ):
                        problems.append(
                            f"persistence changed: buffer {fqn} was "
                            f"{'persistent' if expected else 'non-persistent'}"
                        )
        for view in self.views:
            base = _lookup(module, view.base, "buffer")
            current = _lookup(module, view.fqn, "buffer")
            if base is None or current is None:
                problems.append(f"missing buffer {view.fqn if current is None else view.base}")
                continue
            try:
                expected_view = _derive_view(view, base, like=current)
            except AliasError as e:
                problems.append(f"view inconsistent: {e}")
                continue
            if not _same_view(current, expected_view):
                problems.append(
                    f"view inconsistent: buffer {view.fqn} no longer shares the storage of "
                    f"{view.base} ({view})"
                )
            if _persistent(module, view.fqn) != view.persistent:
                problems.append(f"persistence changed: buffer {view.fqn}")
        if problems:
            raise AliasError(
                "aliased names do not match the captured model:\n"
                + "\n".join(f"  - {p}" for p in problems)
                + "\nCall AliasMap.restore() on the parallelized module and keep_tied() "
                "before init_weights()."
            )

    # ------------------------------------------------------------------ internals

    def _relink_views(
        self, module: nn.Module, *, before: dict[str, _Seen] | None = None
    ) -> list[str]:
        """Re-derive every view that no longer shares its base's memory. ``before``: the
        snapshot taken before init (retie), None for restore."""
        changed: list[str] = []
        for view in self.views:
            base = _lookup(module, view.base, "buffer")
            if base is None:
                raise AliasError(
                    f"buffer {view.base} is missing, so its view {view.fqn} cannot be re-derived"
                )
            if before is not None and base is not (
                kept := _keep_distributed(base, [], [before.get(view.base)])
            ):
                single = AliasGroup("buffer", (view.base,), (_persistent(module, view.base),))
                changed += _tie(module, self.group(view.base) or single, kept)
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
            group = self.group(view.fqn) or AliasGroup("buffer", (view.fqn,), (view.persistent,))
            changed += _tie(module, group, derived)
        return changed

    def _tied_init(self, module: nn.Module, original: Callable, depth: list[int]) -> Callable:
        @functools.wraps(original)
        def init(*args: Any, **kwargs: Any) -> Any:
            if depth[0]:
                return original(*args, **kwargs)
            self.retie(module)
            depth[0] += 1
            try:
                result = original(*args, **kwargs)
            finally:
                depth[0] -= 1
            self.retie(module)
            return result

        init.__alias_map__ = self  # type: ignore[attr-defined]
        return init

    def _snapshot(self, module: nn.Module) -> None:
        snapshot = _SNAPSHOTS.setdefault(module, {})
        names = [(fqn, g.kind) for g in self.groups for fqn in g.fqns]
        names += [(fqn, "buffer") for v in self.views for fqn in (v.fqn, v.base)]
        for fqn, kind in names:
            obj = _lookup(module, fqn, kind)
            if obj is not None:
                layout = (
                    (obj.device_mesh, tuple(obj.placements)) if isinstance(obj, DTensor) else None
                )
                snapshot[fqn] = (id(obj), layout)


def unique_storage_bytes(module: nn.Module) -> int:
    """Bytes of parameter and buffer storage, counting each untyped storage once.

    For a DTensor, its local shard's storage. Aliased names and views add nothing.
    """
    tensors = [t for _, t in module.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in module.named_buffers(remove_duplicate=False)]
    return storage_bytes(tensors)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the untyped storages behind ``tensors``, each counted once (DTensor: its
    local shard's storage)."""
    storages = {}
    for t in tensors:
        storage = _local(t).untyped_storage()
        storages.setdefault(StorageWeakRef(storage), storage.nbytes())
    return sum(storages.values())


# ---------------------------------------------------------------------- helpers


def _capture_views(
    tensors: list[tuple[AliasKind, str, torch.Tensor]], persistent: Callable[[str], bool]
) -> tuple[BufferView, ...]:
    """Find distinct tensors sharing one storage; record buffer views, refuse the rest."""
    by_storage: dict[StorageWeakRef, list[tuple[AliasKind, str, torch.Tensor]]] = {}
    for kind, fqn, t in tensors:
        if t.numel():
            by_storage.setdefault(StorageWeakRef(_local(t).untyped_storage()), []).append(
                (kind, fqn, t)
            )
    views: list[BufferView] = []
    for members in by_storage.values():
        if len(members) < 2:
            continue
        names = ", ".join(f"{kind} {fqn}" for kind, fqn, _ in members)
        if any(kind == "parameter" for kind, _, _ in members):
            raise AliasError(
                f"{names} share one storage (a view or .detach() of a parameter). "
                "Register the tensor once, as a parameter, and derive other values from it "
                "in forward (or register a .clone())."
            )
        if any(isinstance(t, DTensor) for _, _, t in members):
            raise AliasError(f"{names} are DTensors sharing storage: capture before parallelizing")
        if len({t.dtype for _, _, t in members}) > 1:
            raise AliasError(f"{names} view one storage with different dtypes; register .clone()s")

        # [first, last + 1) element of the storage each tensor touches
        spans = {
            id(t): (
                t.storage_offset(),
                t.storage_offset()
                + 1
                + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)),
            )
            for *_, t in members
        }
        whole = (min(a for a, _ in spans.values()), max(b for _, b in spans.values()))
        covers = [(fqn, t) for _, fqn, t in members if t.is_contiguous() and spans[id(t)] == whole]
        if not covers:
            raise AliasError(
                f"{names} share one storage, but none of them is a contiguous tensor covering "
                "the others. Register the tensor they are views of as a buffer too, or "
                "register .clone()s."
            )
        base_fqn, base = covers[0]
        for _, fqn, t in members:
            if t is base:
                continue
            if t.storage_offset() == base.storage_offset() and t.numel() == base.numel():
                if t.shape != base.shape:
                    raise AliasError(
                        f"buffers {base_fqn} {tuple(base.shape)} and {fqn} {tuple(t.shape)} "
                        "are the same memory with different shapes. Register one of them "
                        "and reshape it in forward."
                    )
            views.append(
                BufferView(
                    fqn=fqn,
                    base=base_fqn,
                    offset=t.storage_offset() - base.storage_offset(),
                    size=tuple(t.shape),
                    stride=tuple(t.stride()),
                    base_size=tuple(base.shape),
                    persistent=persistent(fqn),
                )
            )
    return tuple(views)


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


def _wrapped_by(fn: Any, alias_map: AliasMap) -> bool:
    while fn is not None:
        if getattr(fn, "__alias_map__", None) == alias_map:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False
