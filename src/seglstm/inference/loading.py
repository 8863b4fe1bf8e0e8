"""Turn a checkpoint (ours, or the seed's mmseg ``.pth`` plus a config) into a ready-to-run segmentor.

Our Lightning checkpoints carry everything: the preset and its overrides (``hyper_parameters``) and the
data facts inference needs (``seglstm_meta``: classes, palette, normalisation, test_cfg). A foreign
checkpoint carries only weights, so a config must say which model it is and which data it was trained on.
When both exist, the checkpoint decides the architecture (its weights must fit) and the config may change
only how inference runs (``model.test_cfg``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from seglstm.config import META_KEY, compose_config
from seglstm.errors import SeglstmError
from seglstm.models.checkpoint import load_pretrained
from seglstm.models.registry import create_model
from seglstm.utils.io import torch_load


class SegmentorLoadError(SeglstmError, ValueError):
    """The checkpoint and config do not say enough (or contradict each other) to rebuild the model."""


def _data_facts(data_cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """classes / palette / mean / std for a config's ``data`` section, from the dataset definitions."""
    from seglstm.data import MEAN, STD, dataset_class, read_class_file

    name = data_cfg.get("dataset")
    if name is None:
        raise SegmentorLoadError(f"{source}: data.dataset is not set, cannot tell the classes")
    facts: dict[str, Any] = {}
    if data_cfg.get("classes_file"):
        spec = read_class_file(data_cfg["classes_file"])
        facts["classes"], facts["palette"] = list(spec["classes"]), [list(c) for c in spec["palette"]]
    else:
        cls = dataset_class(str(name))
        if not cls.classes:
            raise SegmentorLoadError(
                f"{source}: data.dataset={name!r} needs data.classes_file to name its classes"
            )
        facts["classes"], facts["palette"] = list(cls.classes), [list(c) for c in cls.palette]
    facts["mean"] = [float(v) for v in (data_cfg.get("mean") or MEAN)]
    facts["std"] = [float(v) for v in (data_cfg.get("std") or STD)]
    return facts


def load_segmentor(
    ckpt_path: str | os.PathLike,
    config_path: str | os.PathLike | None = None,
    map_location: Any = "cpu",
    unsafe: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the segmentor of ``ckpt_path`` in eval mode, with what inference needs to know about it.

    Args:
        ckpt_path: a ``seglstm fit`` checkpoint, or a weights-only checkpoint (e.g. the seed's mmseg ``.pth``)
            together with ``config_path``.
        config_path: a seglstm YAML config (``_base_`` lists allowed); required when the checkpoint does not
            record its model, optional otherwise (its ``model.test_cfg`` then overrides the checkpoint's).
        map_location: where tensors are loaded.
        unsafe: allow full unpickling (only for trusted files that are not plain tensor checkpoints).

    Returns:
        ``(model, meta)`` with ``meta`` = ``classes``, ``palette``, ``mean``, ``std``, ``num_classes``,
        ``test_cfg`` and ``model`` (the preset name).
    """
    ckpt = torch_load(ckpt_path, unsafe=unsafe, map_location=map_location)
    if not isinstance(ckpt, Mapping):
        raise SegmentorLoadError(f"{ckpt_path}: expected a checkpoint dictionary, got {type(ckpt).__name__}")
    stored = dict(ckpt.get(META_KEY) or {})
    hparams = dict(ckpt.get("hyper_parameters") or {})
    config = compose_config(config_path) if config_path is not None else {}
    cfg_model = dict(config.get("model") or {})
    source = str(config_path) if config_path is not None else str(ckpt_path)

    name = stored.get("model") or hparams.get("model")
    if name is None:
        name = cfg_model.get("model")
        if name is None:
            raise SegmentorLoadError(
                f"{ckpt_path} does not record its model: pass the config it was trained with (model.model)"
            )
    elif cfg_model.get("model") not in (None, name):
        raise SegmentorLoadError(
            f"{config_path}: model.model={cfg_model['model']!r} but {ckpt_path} holds a {name!r} model"
        )
    recorded = stored.get("model") is not None or hparams.get("model") is not None
    model_kwargs = dict(
        (stored.get("model_kwargs") if recorded else cfg_model.get("model_kwargs"))
        or hparams.get("model_kwargs")
        or {}
    )

    if "classes" in stored and "mean" in stored and "palette" in stored:
        facts = {k: stored[k] for k in ("classes", "palette", "mean", "std")}
    elif config.get("data"):
        facts = {
            **_data_facts(config["data"], source),
            **{k: stored[k] for k in ("classes", "palette") if k in stored},
        }
    else:
        raise SegmentorLoadError(
            f"{ckpt_path} does not record its classes and normalisation: pass the training config (data section)"
        )
    num_classes = stored.get("num_classes") or hparams.get("num_classes") or cfg_model.get("num_classes")
    num_classes = int(num_classes or len(facts["classes"]))
    if len(facts["classes"]) != num_classes:
        raise SegmentorLoadError(
            f"{source}: {len(facts['classes'])} class names ({', '.join(facts['classes'])}) for a "
            f"{num_classes}-class model"
        )

    test_cfg = dict(stored.get("test_cfg") or hparams.get("test_cfg") or {})
    test_cfg.update(cfg_model.get("test_cfg") or {})

    # The checkpoint holds the trained weights: the start weights of training (a path or a weights name,
    # perhaps not on this machine, or needing a download) are not loaded again.
    model_kwargs.pop("pretrained", None)
    model = create_model(name, num_classes=num_classes, **model_kwargs)
    load_pretrained(model, ckpt, strict=True)
    model.eval()
    if test_cfg and hasattr(model, "test_cfg"):
        model.test_cfg = {**model.test_cfg, **test_cfg}
    meta = {
        "model": name,
        "num_classes": num_classes,
        "classes": list(facts["classes"]),
        "palette": [list(c) for c in facts["palette"]],
        "mean": [float(v) for v in facts["mean"]],
        "std": [float(v) for v in facts["std"]],
        "test_cfg": test_cfg,
    }
    return model, meta
