"""Tied embeddings across pipeline stages: tok_embeddings.weight on the first stage and
lm_head.weight on the last are one tensor in the model, and a copy on each of two ranks
under pipeline parallelism.

torchtitan's pipeline_llm gives each stage its own copy of the model's modules, and
torch.distributed.pipelining never syncs parameters between stages (pytorch #126653).
The Trainer keeps the two copies one tensor in value, as Megatron-LM's
``_allreduce_word_embedding_grads`` does: the last stage's value (eager's tie takes
lm_head's init) is sent to the first stage after init; each step the two gradients are
summed before clipping, so both copies get the gradient of the tied tensor, and the
gradient norm counts the tie once. With one optimizer state each, fed the same gradients,
the copies stay bit-equal; the Trainer checks that after init and after every step
(--autoparallel.alias_check). Both copies are planned with one placement (all Shard(0),
constraints.py), so the local shards of the two ranks of a tie group correspond.

A checkpoint holds both names (each stage saves its own), as the eager model's state_dict
does; loading writes each copy from its own name. The optimizer state, which eager holds
once for the tie under its first name (tok_embeddings.weight), is saved and loaded by the
last stage under that name too: checkpoints move between PP and eager either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.tools.logging import logger

FIRST = "tok_embeddings.weight"
LAST = "lm_head.weight"
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True, slots=True)
class TiedStages:
    """This rank's copy of the tied embedding and the group of ranks that hold one."""

    group: dist.ProcessGroup
    """The first-stage and the last-stage rank of this rank's pipeline."""
    source: int
    """The global rank holding the last stage's copy."""
    first: nn.Parameter | None
    """tok_embeddings.weight, where this rank holds the first stage."""
    last: nn.Parameter | None
    """lm_head.weight, where this rank holds the last stage."""

    @classmethod
    def of(cls, model_parts: list[nn.Module], *, pp_mesh) -> TiedStages | None:
        """The tie of a model whose tied embeddings pipeline stages split; None where this
        rank holds neither end (a middle stage of pp > 2). Every rank of the world must call
        it: the tie groups are made together."""
        first = last = None
        for part in model_parts:
            named = dict(part.named_parameters())
            first = named.get(FIRST, first)
            last = named.get(LAST, last)
        assert first is None or last is None, "one rank holds both ends: one tensor"
        pipeline = pp_mesh.mesh.tolist()
        ends = [pipeline[0], pipeline[-1]]
        # One group per pipeline, of its first and last rank (the whole pp group at pp 2).
        pipelines: list[list[int] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(pipelines, pipeline)
        every_ends = sorted({(p[0], p[-1]) for p in pipelines if p is not None})
        group, _ = dist.new_subgroups_by_enumeration([list(e) for e in every_ends])
        if first is None and last is None:
            return None
        # torchtitan places stage s on pipeline rank s % pp (looped schedules): the first
        # stage on the pipeline's first rank, the last on its last.
        rank = dist.get_rank()
        assert (first is not None) == (rank == ends[0]), (rank, ends)
        assert (last is not None) == (rank == ends[1]), (rank, ends)
        return cls(group=group, source=ends[1], first=first, last=last)

    @property
    def copy(self) -> nn.Parameter:
        held = self.first if self.first is not None else self.last
        assert held is not None
        return held

    def sync_values(self) -> None:
        """Send the last stage's value to the first stage's copy (after init_weights, each
        stage initialized its own)."""
        with torch.no_grad():
            dist.broadcast(_local(self.copy), src=self.source, group=self.group)
        logger.info(f"Tied {FIRST} = {LAST} across pipeline stages: values synced")

    def differs(self) -> bool:
        """Whether this rank's shard of the tie and the other end's differ in any bit (a
        checksum of their bits, exchanged in the tie group)."""
        local = _local(self.copy).detach().contiguous()
        bits = local.view(_INT_OF_SIZE[local.element_size()])
        checksum = bits.sum(dtype=torch.int64).reshape(1)
        ends = [torch.empty_like(checksum) for _ in range(2)]
        dist.all_gather(ends, checksum, group=self.group)
        return not torch.equal(ends[0], ends[1])

    def name_optimizer_state_as_eager(self, optimizers) -> None:
        """On the last stage, save and load lm_head.weight's optimizer state (torchtitan's
        flat keys: state.<fqn>.<name>, param_groups.<fqn>.<key>) under tok_embeddings.weight,
        the one name eager's optimizer gives the tie; the first stage saves the same values
        under it, and DCP writes them once."""
        if self.last is None:
            return
        state_dict, load_state_dict = optimizers.state_dict, optimizers.load_state_dict
        renames = [(f"{kind}.{LAST}.", f"{kind}.{FIRST}.") for kind in ("state", "param_groups")]

        def rename(flat: dict, *, saving: bool) -> dict:
            renamed = {}
            for key, value in flat.items():
                for stage_name, eager_name in renames:
                    old, new = (stage_name, eager_name) if saving else (eager_name, stage_name)
                    if key.startswith(old):
                        key = new + key[len(old) :]
                renamed[key] = value
            return renamed

        optimizers.state_dict = lambda: rename(state_dict(), saving=True)
        optimizers.load_state_dict = lambda flat: load_state_dict(rename(flat, saving=False))

    def sum_gradients(self) -> None:
        """Both copies' gradients become their sum: the gradient of the tied tensor."""
        grad = self.copy.grad
        if grad is None:
            raise RuntimeError(f"the tied {FIRST} / {LAST} has no gradient on this stage")
        dist.all_reduce(_local(grad), group=self.group)

    def clip(
        self, clip: Callable[..., torch.Tensor], parameters: Iterable[torch.Tensor], *args, **kwargs
    ) -> torch.Tensor:
        """torchtitan's clip_grad_norm_ over every parameter but the first stage's copy (its
        gradient is the last stage's: the norm counts the tie once), then that copy clipped
        by the same total norm."""
        if self.first is None:
            return clip(parameters, *args, **kwargs)
        total_norm = clip([p for p in parameters if p is not self.first], *args, **kwargs)
        max_norm = args[0] if args else kwargs["max_norm"]
        torch.nn.utils.clip_grads_with_norm_(
            [self.first], max_norm, total_norm, foreach=kwargs.get("foreach")
        )
        return total_norm


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's shard, as a view of the tensor's storage (written in place)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
