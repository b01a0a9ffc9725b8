"""Aliased parameters, buffers and submodules: capture them, restore them, keep them tied.

A model may register one object under several names: tied weights
(``tok_embeddings.weight = lm_head.weight``), one RoPE cache registered in many modules,
one submodule reachable under two names. ``named_parameters()``, ``named_buffers()`` and
``named_modules()`` deduplicate by default, and parallelizers (tracing, fake tensors,
deepcopy, ``to_empty``, ``distribute_module``) drop the extra names or split them into
separate tensors. This module records the aliasing of the original model and re-creates it
on whatever module the parallelizer returns, through ``alias_relink``. It depends on torch only.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef

from torchtitan_ext.alias_relink import (
    _SNAPSHOTS,
    AliasError,
    AliasGroup,
    AliasKind,
    BufferView,
    _check_compatible,
    _derive_view,
    _holds,
    _keep_distributed,
    _local,
    _lookup,
    _persistent,
    _present,
    _relink_views,
    _same_view,
    _snapshot,
    _tie,
)

__all__ = [
    "AliasError",
    "AliasGroup",
    "AliasKind",
    "AliasMap",
    "BufferView",
    "unique_storage_bytes",
]

# Modules first: restoring module "a" re-creates every name below it.
_KINDS: tuple[AliasKind, ...] = ("module", "parameter", "buffer")


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
        changed += _relink_views(module, self.views, self.group)
        _snapshot(module, self.groups, self.views)
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
        changed += _relink_views(module, self.views, self.group, before=before)
        _snapshot(module, self.groups, self.views)
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


def _wrapped_by(fn: Any, alias_map: AliasMap) -> bool:
    while fn is not None:
        if getattr(fn, "__alias_map__", None) == alias_map:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False
