"""The private Lightning/torch names seglstm relies on still exist with the expected signatures; an upgrade
that renames one fails here, by name, instead of silently disabling a hook."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader

from seglstm.training import _lightning_compat as compat


def test_installed_lightning_and_torch_provide_every_private_name() -> None:
    problems = compat.compat_problems()
    assert not problems, f"incompatible {compat.versions()}:\n" + "\n".join(problems)


def test_the_check_fails_loudly_on_a_missing_or_changed_name(monkeypatch: pytest.MonkeyPatch) -> None:
    class Old:
        def _monitor_candidates(self, pl_trainer):  # renamed parameter
            return {}

    monkeypatch.setattr(compat, "PRIVATE_USES", [
        (Old, "_monitor_candidates", ("trainer",), "x"), (Old, "_gone", None, "y"), (Old, "_gone_method", (), "z"),
    ])  # fmt: skip
    problems = compat.compat_problems()
    assert len(problems) == 3
    assert "now takes ('pl_trainer',), expected ('trainer',)" in problems[0]
    assert "_gone is gone" in problems[1] and "_gone_method is gone" in problems[2]


def test_every_private_override_is_listed() -> None:
    """Our subclasses of Lightning/torch classes override no private name that PRIVATE_USES does not list
    (their own private helpers, which the base class lacks, are fine)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from seglstm.cli.lightning import SegLightningCLI
    from seglstm.training.callbacks import RunCheckpoint
    from seglstm.training.trainer import SegTrainer

    listed = {(owner, name) for owner, name, _, _ in compat.PRIVATE_USES}
    pairs = ((compat.IndexSamplerHookLoader, DataLoader), (SegLightningCLI, LightningCLI),
             (RunCheckpoint, ModelCheckpoint), (SegTrainer, Trainer))  # fmt: skip
    for cls, base in pairs:
        for name in vars(cls):
            if name.startswith("_") and not name.startswith("__") and compat._has(base, name):
                assert (base, name) in listed, f"{cls.__name__}.{name} overrides an unlisted private name"


def test_the_cli_overrides_no_private_lightning_name() -> None:
    from seglstm.cli.lightning import SegLightningCLI

    assert not [owner for owner, _, _, _ in compat.PRIVATE_USES if owner.__name__ == "LightningCLI"]
    assert "_parse_ckpt_path" not in vars(SegLightningCLI) and "_prepare_subcommand_parser" not in vars(SegLightningCLI)


def test_index_sampler_hook_is_what_torch_iterates() -> None:
    seen = []

    class Loader(compat.IndexSamplerHookLoader):
        def wrap_index_sampler(self, sampler):
            seen.append(sampler)
            return [[2, 0]]

    assert [b.tolist() for b in Loader(list(range(10, 15)), batch_size=2)] == [[12, 10]]
    assert seen and isinstance(seen[0], type(DataLoader(range(3), batch_size=2).batch_sampler))
