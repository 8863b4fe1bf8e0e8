"""``_base_`` composition: nested mappings merge as mmengine merges them, ``_delete_: true`` replaces."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from seglstm.cli.main import main as seglstm
from seglstm.config import ConfigError, compose_config, merge_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _child(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "child.yaml"
    path.write_text(f"_base_: [{DEMO}]\n{body}")
    return path


def test_nested_key_over_demo_keeps_the_demo_preset(tmp_path: Path) -> None:
    demo = compose_config(DEMO)
    child = compose_config(_child(tmp_path, "model:\n  model_kwargs:\n    img_size: 32\n"))
    expected = yaml.safe_load(yaml.safe_dump(demo))  # an independent deep copy, edited by hand
    expected["model"]["model_kwargs"]["img_size"] = 32
    assert child == expected
    assert child["model"]["model_kwargs"]["depths"] == [1, 1, 1, 1]
    assert child["model"]["model"] == "seglstm_upernet_t"


def test_print_config_shows_the_merged_result(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _child(tmp_path, "model:\n  model_kwargs:\n    img_size: 32\n")
    with pytest.raises(SystemExit) as stop:
        seglstm(["fit", "--config", str(cfg), "--print_config"])
    assert stop.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    kwargs = printed["model"]["model_kwargs"]
    assert kwargs["img_size"] == 32 and kwargs["patch_size"] == 8 and kwargs["depths"] == [1, 1, 1, 1]
    assert printed["model"]["lr"] == 2.0e-3  # demo's own, over the 15k schedule's 6e-4


def test_delete_replaces_the_whole_mapping(tmp_path: Path) -> None:
    child = compose_config(_child(tmp_path, "model:\n  model_kwargs:\n    _delete_: true\n    img_size: 32\n"))
    assert child["model"]["model_kwargs"] == {"img_size": 32}
    assert child["model"]["lr"] == 2.0e-3  # only the marked mapping is replaced


def test_merge_rules_lists_class_paths_and_inputs_untouched() -> None:
    base = {"a": {"b": {"c": 1, "d": [1, 2]}, "e": 2}, "cb": {"class_path": "x.A", "init_args": {"p": 1, "q": 2}}}
    update = {"a": {"b": {"d": [3]}}, "cb": {"class_path": "x.B", "init_args": {"p": 5}}}
    snapshot = yaml.safe_dump(base)
    out = merge_config(base, update)
    assert out == {"a": {"b": {"c": 1, "d": [3]}, "e": 2}, "cb": {"class_path": "x.B", "init_args": {"p": 5}}}
    assert yaml.safe_dump(base) == snapshot
    same_class = merge_config(base, {"cb": {"init_args": {"q": 7}}})
    assert same_class["cb"] == {"class_path": "x.A", "init_args": {"p": 1, "q": 7}}
    with pytest.raises(ConfigError, match=r"a\._delete_ must be true or false"):
        merge_config(base, {"a": {"_delete_": "yes"}})
