"""A text dataloader whose batches do not depend on the data-parallel degree.

torchtitan's HuggingFaceTextDataLoader splits the *documents* between data-parallel ranks
(``split_dataset_by_node``), so a 2-rank run trains on other token sequences than a 1-rank
run and their losses cannot be compared. Here every rank reads the sample stream a 1-rank
run reads and keeps its contiguous share of each global batch: rank r of N gets rows
[r*B, (r+1)*B) of the 1-rank run's global batch of N*B rows. Losses then match across
degrees up to floating-point reduction order, which the parity tests rely on. Each rank
tokenizes the whole stream, which costs nothing at our dataset sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader, HuggingFaceTextDataset


class _GlobalBatchSlice(IterableDataset, Stateful):
    """The samples of ``dataset`` that fall in this rank's rows of each global batch."""

    def __init__(
        self, dataset: HuggingFaceTextDataset, *, dp_rank: int, dp_world_size: int, rows: int
    ):
        self.dataset = dataset
        self.dp_rank = dp_rank
        self.global_rows = rows * dp_world_size
        self.rows = rows
        self.samples_seen = 0

    def __iter__(self) -> Iterator[Any]:
        for sample in self.dataset:
            row = self.samples_seen % self.global_rows
            self.samples_seen += 1
            if row // self.rows == self.dp_rank:
                yield sample

    def state_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset.state_dict(), "samples_seen": self.samples_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state_dict["dataset"])
        self.samples_seen = state_dict["samples_seen"]


class GlobalBatchTextDataLoader(HuggingFaceTextDataLoader):
    """HuggingFaceTextDataLoader with batches independent of the data-parallel degree."""

    @dataclass(kw_only=True, slots=True)
    class Config(HuggingFaceTextDataLoader.Config):
        pass

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: BaseTokenizer,
        seq_len: int,
        local_batch_size: int,
        snapshot_every_n_steps: int | None = 1,
        **kwargs,
    ):
        stream = HuggingFaceTextDataset(
            dataset_name=config.dataset,
            dataset_path=config.dataset_path,
            tokenizer=tokenizer,
            seq_len=seq_len,
            dp_rank=0,
            dp_world_size=1,
            infinite=config.infinite,
        )
        dataset = _GlobalBatchSlice(
            stream, dp_rank=dp_rank, dp_world_size=dp_world_size, rows=local_batch_size
        )
        ParallelAwareDataloader.__init__(
            self,
            dataset,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            num_workers=config.num_workers,
            persistent_workers=config.persistent_workers,
            pin_memory=config.pin_memory,
            prefetch_factor=config.prefetch_factor,
            snapshot_every_n_steps=snapshot_every_n_steps,
            batch_size=local_batch_size,
        )
