"""Toy models with aliased parameters, buffers and submodules, for tests/test_aliases.py.

Every ``init_weights`` is deterministic (no RNG), so a parallelized copy and the plain
model initialize to the same values whatever the engine does to random streams, and it
works on plain tensors and on DTensors (``fill_``). Each model also says what its aliased
names must hold after init (``expected_init``), computed independently of the model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

VOCAB, DIM, SEQ, BATCH = 32, 16, 8, 4


def values(*shape: int, seed: float) -> torch.Tensor:
    """Deterministic, well-spread init values."""
    n = torch.arange(torch.Size(shape).numel(), dtype=torch.float32)
    return (torch.sin(n * 0.37 + seed) * 0.5).reshape(shape)


def fill_(tensor: torch.Tensor, new: torch.Tensor) -> None:
    """In-place init of a plain tensor or a DTensor (each rank writes its own shard)."""
    with torch.no_grad():
        if isinstance(tensor, DTensor):
            new = distribute_tensor(
                new.to(tensor.device), tensor.device_mesh, tensor.placements, src_data_rank=None
            )
        tensor.copy_(new)


def rope_table(rows: int = SEQ) -> torch.Tensor:
    pos = torch.arange(rows, dtype=torch.float32)[:, None]
    return torch.cos(pos * torch.linspace(0.1, 1.0, DIM)) + 1.0


class TiedLM(nn.Module):
    """Tied embedding/output, used on both names in forward (torchtitan's weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.tok_embeddings.weight = self.lm_head.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.proj(self.tok_embeddings(tokens))))

    def init_weights(self) -> None:
        fill_(self.lm_head.weight, values(VOCAB, DIM, seed=1.0))
        fill_(self.proj.weight, values(DIM, DIM, seed=2.0))
        fill_(self.proj.bias, values(DIM, seed=3.0))
        # torchtitan re-ties in init_states the same way
        self.tok_embeddings.weight = self.lm_head.weight

    @staticmethod
    def sample(batch: int = BATCH, seed: int = 0) -> torch.Tensor:
        return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))

    @staticmethod
    def expected_init() -> dict[str, torch.Tensor]:
        w = values(VOCAB, DIM, seed=1.0)
        return {"tok_embeddings.weight": w, "lm_head.weight": w}


class RoPE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", torch.empty(SEQ, DIM), persistent=False)

    def init_weights(self) -> None:
        self.cache = rope_table()  # a new tensor for this one name, as torchtitan's RoPE does


class Scaled(nn.Module):
    def __init__(self, freqs: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)
        self.register_buffer("freqs", freqs)  # persistent alias of rope.cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x)) * self.freqs


class SharedBuffers(nn.Module):
    """One buffer under three FQNs in different submodules (two persistent, one not);
    init reassigns the last name only."""

    def __init__(self) -> None:
        super().__init__()
        rope = RoPE()
        self.layers = nn.ModuleList([Scaled(rope.cache), Scaled(rope.cache)])
        self.rope = rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x * self.rope.cache

    def init_weights(self) -> None:
        for i, layer in enumerate(self.layers):
            fill_(layer.proj.weight, values(DIM, DIM, seed=4.0 + i))
            fill_(layer.proj.bias, values(DIM, seed=6.0 + i))
        self.rope.init_weights()

    @staticmethod
    def sample(batch: int = BATCH, seed: int = 0) -> torch.Tensor:
        return torch.randn(batch, SEQ, DIM, generator=torch.Generator().manual_seed(seed))

    @staticmethod
    def expected_init() -> dict[str, torch.Tensor]:
        names = ("layers.0.freqs", "layers.1.freqs", "rope.cache")
        return {name: rope_table() for name in names}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.register_buffer("scale", torch.empty(DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)) * self.scale

    def init_weights(self) -> None:
        fill_(self.lin.weight, values(DIM, DIM, seed=8.0))
        fill_(self.lin.bias, values(DIM, seed=9.0))
        fill_(self.scale, values(DIM, seed=10.0) + 1.0)


class AliasedBlock(nn.Module):
    """One submodule under two names (``mirror is block``), applied twice in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.block = Block()
        self.mirror = self.block
        self.register_buffer("offset", torch.empty(DIM), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mirror(self.block(self.inp(x))) + self.offset

    def init_weights(self) -> None:
        fill_(self.inp.weight, values(DIM, DIM, seed=11.0))
        fill_(self.inp.bias, values(DIM, seed=12.0))
        self.mirror.init_weights()
        fill_(self.offset, values(DIM, seed=13.0))

    sample = SharedBuffers.sample

    @staticmethod
    def expected_init() -> dict[str, torch.Tensor]:
        scale = values(DIM, seed=10.0) + 1.0
        return {"block.scale": scale, "mirror.scale": scale}


class ViewBuffers(nn.Module):
    """Buffer ``head`` is a view of buffer ``table``; init assigns a new ``table``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)
        self.register_buffer("table", torch.empty(2 * SEQ, DIM), persistent=False)
        self.register_buffer("head", self.table[:SEQ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x)) * self.head + self.table[SEQ:]

    def init_weights(self) -> None:
        fill_(self.proj.weight, values(DIM, DIM, seed=14.0))
        fill_(self.proj.bias, values(DIM, seed=15.0))
        self.table = rope_table(2 * SEQ)

    sample = SharedBuffers.sample

    @staticmethod
    def expected_init() -> dict[str, torch.Tensor]:
        return {"table": rope_table(2 * SEQ), "head": rope_table(2 * SEQ)[:SEQ]}


MODELS: dict[str, type[nn.Module]] = {
    "tied": TiedLM,
    "shared_buffers": SharedBuffers,
    "aliased_block": AliasedBlock,
    "view": ViewBuffers,
}
