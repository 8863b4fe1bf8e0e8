"""The shared fixtures themselves: the registry is restored after every test, the fake clock only moves
when told to. The two registry tests run in file order: the second checks what the first left behind."""

from __future__ import annotations

import pytest
from torch import nn

from seglstm.models.registry import create_model, list_encoders, list_models, register_model


def _probe_fixture_seg(num_classes: int) -> nn.Module:
    return nn.Conv2d(3, num_classes, 1)


def _probe_plain_seg(num_classes: int) -> nn.Module:
    return nn.Conv2d(3, num_classes, 1)


def _probe_encoder() -> nn.Module:
    return nn.Identity()


def test_registrations_are_visible_inside_the_test(registry):
    registry.model(_probe_fixture_seg)
    registry.encoder(_probe_encoder)
    register_model(_probe_plain_seg)  # straight into the production registry: undone all the same
    assert {"_probe_fixture_seg", "_probe_plain_seg"} <= set(list_models())
    assert create_model("_probe_fixture_seg", num_classes=2).out_channels == 2
    assert "_probe_encoder" in list_encoders()


def test_registrations_are_gone_after_the_test():
    names = set(list_models())
    assert "_probe_fixture_seg" not in names and "_probe_plain_seg" not in names
    assert "_probe_encoder" not in list_encoders() and "vil_s" in list_encoders()
    assert "seglstm_upernet_s" in names  # the built-in presets stay


def test_importing_test_helpers_registers_nothing():
    """Test presets come from fixtures, so importing (collecting) the modules that define them leaves the
    registry alone (test_training_task.py is collected with the whole suite)."""
    from tests import reliability_helpers

    assert callable(reliability_helpers.rel_tiny_seg)
    names = set(list_models())
    assert "rel_tiny_seg" not in names and "tiny_standin_seg" not in names


def test_fake_clock_moves_only_forward(fake_clock):
    assert fake_clock() == 0.0
    fake_clock.advance(2.5)
    assert fake_clock() == 2.5
    with pytest.raises(ValueError, match="does not go back"):
        fake_clock.advance(-1)
