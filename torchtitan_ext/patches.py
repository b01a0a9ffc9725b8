"""Adaptations of torch and AutoParallel that AutoParallel's planning needs here. Each
says which limitation it answers and when it can go.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# The forward region's kwargs key for the gradient placements (adapt_local_map_hop), and
# torch's autograd kernel of the HOP that the adaptation wraps.
_GRAD_PLACEMENTS = "torchtitan_ext_in_grad_placements"
_torch_autograd_kernel = None


def adapt_local_map_hop() -> None:
    """What the expert region needs of torch 2.14's local_map HOP (the form AutoParallel
    a54c252 traces local_map into) that it lacks; idempotent.

    1. AutoParallel recognizes a local_map node by "call_local_map" in str(target) (torch's
       earlier local_map function); LocalMapHOP's str is the default object repr, so the
       solver asserts. The HOP is named as AutoParallel reads it. Goes when AutoParallel
       matches the HOP by type.
    2. ``in_grad_placements``: the HOP's autograd rejects them ("not yet supported") and
       gives the backward region the forward's ``in_placements`` as the placements of the
       gradients it returns; AutoParallel asserts they are None. So an input replicated on
       an axis whose ranks compute different partial gradients (the expert weights on
       efsdp) gets a gradient declared complete, and the plan never sums it: wrong
       gradients, silently (meta-pytorch/autoparallel#515). Here the gradients are
       declared as given: the forward region's kwargs keep them under a private key
       (AutoParallel's assert sees None) and the backward region returns them as its
       ``out_placements``, from which the solver plans the reduction like any Partial.
       Goes when torch's HOP honours in_grad_placements and AutoParallel reads them
       (the approach of meta-pytorch/autoparallel#512, closed unmerged).
    """
    global _torch_autograd_kernel
    from torch._C import DispatchKey
    from torch._higher_order_ops import local_map as hop

    hop.LocalMapHOP.__str__ = lambda self: f"call_local_map[{self.name()}]"
    kernels = hop.local_map_hop.py_kernels
    if kernels[DispatchKey.Autograd] is not _autograd_with_grad_placements:
        _torch_autograd_kernel = kernels[DispatchKey.Autograd]
        kernels[DispatchKey.Autograd] = _autograd_with_grad_placements
        hop.local_map_hop._dispatch_cache.clear()


def _autograd_with_grad_placements(fw_gm, *args, **kwargs):
    """torch's autograd kernel of local_map_hop, with in_grad_placements honoured
    (adapt_local_map_hop, 2.)."""
    from torch._higher_order_ops import local_map as hop

    kw = fw_gm.meta["local_map_kwargs"]
    grads = kw.get(_GRAD_PLACEMENTS) or kw.get("in_grad_placements")
    if grads is None or not hop._DEFER_INLINING:
        return _torch_autograd_kernel(fw_gm, *args, **kwargs)
    fw_gm.meta["local_map_kwargs"] = {**kw, "in_grad_placements": None, _GRAD_PLACEMENTS: grads}
    fw_gm, bw_gm, num_fw_ins, num_fw_outs, filtered_grads_idx = hop.create_hop_fw_bw(fw_gm, *args)
    # None: the gradient placed like its input (local_map's own default).
    bw_gm.meta["local_map_kwargs"]["out_placements"] = tuple(
        placement if grad is None else grad
        for placement, grad in zip(kw["in_placements"], grads, strict=True)
    )
    return hop.LocalMapAutogradOp.apply(
        fw_gm, bw_gm, num_fw_ins, num_fw_outs, filtered_grads_idx, *args, **kwargs
    )


@contextlib.contextmanager
def memoized_redistribute_costs() -> Iterator[None]:
    """Memoize DTensor's redistribute_cost while AutoParallel builds its strategy tables.

    AutoParallel a54c252 costs every (producer strategy, consumer input spec) pair with
    torch's generate_redistribute_costs; the same pairs recur in every layer and strategy,
    so most calls repeat an earlier one (benchmarks/scaling.py measures the phases). The
    cost is a function of the two specs alone (mesh,
    placements, shard order, shape, stride and dtype: what DTensorSpec hashes and
    compares), so each pair is computed once. Specs that do not hash (symbolic shapes)
    are costed as before. Goes when torch or AutoParallel caches these costs.
    """
    from torch.distributed.tensor._ops import utils

    cost = utils.redistribute_cost
    memo: dict = {}

    def memoized(current_spec, target_spec) -> float:
        try:
            key = (current_spec, target_spec)
            if key not in memo:
                memo[key] = cost(current_spec, target_spec)
            return memo[key]
        except TypeError:
            return cost(current_spec, target_spec)

    utils.redistribute_cost = memoized
    try:
        yield
    finally:
        utils.redistribute_cost = cost
