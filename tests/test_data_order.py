"""Mid-epoch resume through Lightning: ResumableDataLoader continues the uninterrupted run's exact batch
order; torchdata's StatefulDataLoader, under Lightning's loop, does not (see ``_lightning_compat``), which
is why seglstm keeps its own loader. The StatefulDataLoader test fails the day it resumes correctly, so the
project can then switch to it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from seglstm.data.base import EpochSampler
from seglstm.training.data_order import ResumableDataLoader

ITEMS, BATCH, STOP, END = 10, 2, 7, 13  # 5 batches per epoch: step 7 stops in epoch 1, step 13 in epoch 2


class _Items(Dataset):
    """Returns its ``(epoch, index)`` key, so a batch records both the order and the epoch it was drawn for."""

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        return torch.tensor(key)


class _Recorder(pl.LightningModule):
    def __init__(self, seen: list[list[tuple[int, int]]]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(1))
        self.seen = seen

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append([(int(e), int(i)) for e, i in batch.tolist()])
        return (self.weight**2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Data(pl.LightningDataModule):
    def __init__(self, loader_class: type, seed: int) -> None:
        super().__init__()
        self.loader_class, self.seed = loader_class, seed

    def train_dataloader(self):
        return self.loader_class(_Items(), batch_size=BATCH, sampler=EpochSampler(ITEMS, seed=self.seed))


def _fit(loader_class: type, seed: int, max_steps: int, folder: Path | None = None, ckpt: str | None = None):
    seen: list[list[tuple[int, int]]] = []
    save = folder is not None and ckpt is None
    trainer = pl.Trainer(
        max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1, enable_checkpointing=save,
        callbacks=[ModelCheckpoint(dirpath=folder, filename="stop", every_n_train_steps=STOP)] if save else [],
    )  # fmt: skip
    trainer.fit(_Recorder(seen), datamodule=_Data(loader_class, seed), ckpt_path=ckpt)
    return seen


def _interrupted_and_uninterrupted(loader_class: type, tmp_path: Path, seed: int):
    full = _fit(loader_class, seed, END)
    first = _fit(loader_class, seed, STOP, folder=tmp_path)
    rest = _fit(loader_class, seed, END, folder=tmp_path, ckpt=str(tmp_path / "stop.ckpt"))
    assert len(full) == END and len(first) == STOP
    # The reference itself: every epoch a permutation of all items, drawn for that epoch.
    for epoch in range(2):
        drawn = [item for batch in full[epoch * 5 : epoch * 5 + 5] for item in batch]
        assert sorted(drawn) == [(epoch, i) for i in range(ITEMS)]
    return full, first + rest


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resumable_loader_resumes_mid_epoch_in_the_uninterrupted_order(tmp_path: Path) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    full, resumed = _interrupted_and_uninterrupted(ResumableDataLoader, tmp_path, seed)
    assert resumed == full


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_stateful_dataloader_resumes_mid_epoch_with_the_wrong_epoch(tmp_path: Path) -> None:
    """Lightning creates the train iterator (``iter`` in ``setup_data``) before ``set_epoch`` (in
    ``on_advance_start``); StatefulDataLoader replays its saved position while creating the iterator, so the
    resumed epoch 1 is drawn with the sampler's epoch still 0: the rest of epoch 0's order, not epoch 1's.
    When this starts to fail, StatefulDataLoader can replace ResumableDataLoader."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    full, resumed = _interrupted_and_uninterrupted(StatefulDataLoader, tmp_path, seed)
    assert resumed[:STOP] == full[:STOP]  # the same run up to the checkpoint
    rest_of_epoch = resumed[STOP:10]
    assert rest_of_epoch != full[STOP:10]
    assert rest_of_epoch == full[STOP - 5 : 5], "not epoch 0's order from the same position"
    assert resumed[10:] == full[10:]  # the next epoch, set before its iterator starts, is right again
