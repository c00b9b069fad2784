"""Micro-batches sized by tokens (training.micro_batch_size: auto on padding-free data).

The pure planning is core/batch.py (deal a step's rows to the ranks, split each share into k micro-batches of
at most micro_batch_tokens); this module feeds it the dataset's real lengths and the Trainer's row order, and
plugs the result into the Trainer's train dataloader:

- `row_order(n, seed, epoch)` is the permutation accelerate's seedable sampler draws for that epoch (the one a
  fixed micro batch trains on), so an `auto` run's optimizer steps hold exactly the rows of an explicit run at the
  same global batch, and the adapters agree to float summation order.
- `plan_run(...)` fixes the accumulation k up front: the most micro-batches any rank needs in any step of any
  epoch the run touches. Every rank then runs k forward/backward passes per optimizer step.
- `TokenBatchSampler` yields, per step, the W x k micro-batches interleaved (rank0-mb0, rank1-mb0, ...), so
  accelerate's BatchSamplerShard hands rank r every W-th one; on one process it yields them all.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from scalesft.core.batch import BatchError, TokenPlan, epoch_layouts, interleave, plan_token_batches, steps_per_epoch


def row_lengths(dataset) -> list[int]:
    """Tokens per row (len(input_ids)), read from the Arrow column without materialising the token lists."""
    try:
        import pyarrow.compute as pc

        col = dataset.select_columns(["input_ids"]).with_format("arrow")[:]["input_ids"]
        return pc.list_value_length(col).to_pylist()
    except Exception:  # noqa: BLE001 - not an Arrow-backed datasets.Dataset
        return [len(row["input_ids"]) for row in dataset]


def row_order(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's row order: accelerate's SeedableRandomSampler (data_seed + epoch), as the Trainer shuffles."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


def epochs_touched(num_rows: int, global_batch_size: int, max_steps: int, num_train_epochs: float) -> int:
    spe = steps_per_epoch(num_rows, global_batch_size)
    return math.ceil(max_steps / spe) if max_steps > 0 else max(1, math.ceil(num_train_epochs))


def plan_run(lengths: list[int], *, global_batch_size: int, world_size: int, budget: int, seed: int,
             max_steps: int, num_train_epochs: float) -> TokenPlan:
    n = len(lengths)
    epochs = epochs_touched(n, global_batch_size, max_steps, num_train_epochs)
    return plan_token_batches((row_order(n, seed, e) for e in range(epochs)), lengths,
                              global_batch_size=global_batch_size, world_size=world_size, budget=budget)


class TokenBatchSampler(torch.utils.data.Sampler):
    """Batches of row indices for all ranks (see the module docstring). `batch_size` None tells accelerate the
    batches vary in size; the epoch comes from `epoch_of()` (the Trainer's state: right after a resume too)."""

    batch_size = None
    drop_last = False

    def __init__(self, lengths: list[int], plan: TokenPlan, seed: int, epoch_of=None):
        self.lengths, self.plan, self.seed, self.epoch_of = lengths, plan, seed, epoch_of
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.plan.batches_per_epoch * self.plan.world_size

    def __iter__(self):
        epoch = self.epoch_of() if self.epoch_of is not None else self.epoch
        for layout in epoch_layouts(row_order(len(self.lengths), self.seed, epoch), self.lengths, self.plan):
            yield from interleave(layout)
        if self.epoch_of is None:
            self.epoch += 1


def token_dataloader(trainer, sampler: TokenBatchSampler):
    """The Trainer's train dataloader (transformers' Trainer._get_dataloader) with our batch sampler."""
    import datasets
    from torch.utils.data import DataLoader
    from transformers.trainer_utils import seed_worker

    args = trainer.args
    dataset, collator = trainer.train_dataset, trainer.data_collator
    if isinstance(dataset, datasets.Dataset):
        dataset = trainer._remove_unused_columns(dataset, description="Training")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="Training")
    if row_lengths(dataset) != sampler.lengths:  # the rows the plan was made for, as the Trainer holds them
        raise BatchError(f"the trainer's training set ({len(dataset)} rows) is not the one the token plan was made "
                         f"for ({len(sampler.lengths)} rows): its rows changed length or order after tokenizing")
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=args.dataloader_num_workers,
                        pin_memory=args.dataloader_pin_memory, persistent_workers=args.dataloader_persistent_workers,
                        prefetch_factor=args.dataloader_prefetch_factor, in_order=args.dataloader_in_order,
                        multiprocessing_context=args.dataloader_multiprocessing_context,
                        worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers,
                                               rank=args.process_index))
    return trainer.accelerator.prepare(loader)


def trainer_epoch(trainer) -> int:
    """The epoch the Trainer is about to iterate (its state's epoch, floored; 0 before training starts)."""
    state = getattr(trainer, "state", None)
    return int((getattr(state, "epoch", None) or 0) + 1e-6)
