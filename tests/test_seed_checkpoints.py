"""The seed's mmseg 1.2.1 checkpoint layout loads into our presets with strict=True.

The fixture is the key list (names and shapes) of all 10 ViL-S presets, read from the seed's configs built
with mmseg 1.2.1 at the commit its ``info`` records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from seglstm.models import seglstm as _presets  # noqa: F401  (registers the seglstm_* presets)
from seglstm.models.registry import create_model

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "seed_checkpoint_keys.json"
SEED = json.loads(REFERENCE.read_text())["presets"]


def seed_shapes(name: str) -> dict[str, list[int]]:
    """Every key of the seed checkpoint with its shape, blocks expanded from the template."""
    p = SEED[name]
    shapes = {**p["backbone_non_block"], **p["decode_head"], **p["auxiliary_head"]}
    for stage, count in p["backbone_blocks"].items():
        for j in range(count):
            for key, shape in p["backbone_block_template"].items():
                shapes[f"backbone.{stage}.{j}.{key}"] = shape
    return shapes


def random_state_dict(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.randint(1, 10_000, (), generator=g)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[key] = torch.randn(shape, generator=g)
    return sd


@pytest.fixture(scope="module", params=sorted(SEED))
def preset(request):
    name = request.param
    return name, create_model(name, num_classes=7)


def test_seed_checkpoint_loads_strictly(preset):
    name, model = preset
    shapes = seed_shapes(name)
    assert len(shapes) == SEED[name]["n_keys"]
    # the recorded parameter count leaves out the scalar num_batches_tracked entries
    assert sum(math.prod(s) for s in shapes.values() if s) == SEED[name]["n_params"]

    own = model.state_dict()
    assert {k: list(v.shape) for k, v in own.items()} == shapes
    sd = random_state_dict(shapes)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = model.state_dict()
    for key in (next(k for k in sd if k.startswith("decode_head.")), "auxiliary_head.conv_seg.weight",
                "backbone.pos_embed.embed", f"backbone.blocks{len(SEED[name]['backbone_blocks'])}.0.norm.weight"):
        assert torch.equal(loaded[key], sd[key]), key


def test_missing_decode_head_key_is_named():
    model = create_model("seglstm_deeplabv3plus_s", num_classes=7)
    sd = random_state_dict(seed_shapes("seglstm_deeplabv3plus_s"))
    del sd["decode_head.sep_bottleneck.1.depthwise_conv.bn.running_var"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*decode_head\.sep_bottleneck\.1\.depthwise_conv\.bn"):
        model.load_state_dict(sd, strict=True)


def test_ann_checkpoint_needs_both_names_of_the_shared_projection():
    """The shared key/query projection of the APNB is stored twice; a strict load consumes both, and a
    checkpoint lacking the ``query_project`` copy is rejected."""
    model = create_model("seglstm_ann_s", num_classes=7)
    sd = random_state_dict(seed_shapes("seglstm_ann_s"))
    key = "decode_head.context.stages.0.query_project.conv.weight"
    sd[key] = sd[key.replace("query_project", "key_project")].clone()
    model.load_state_dict(sd, strict=True)
    stage = model.decode_head.context.stages[0]
    assert stage.query_project is stage.key_project
    assert torch.equal(stage.key_project.conv.weight, sd[key])
    del sd[key]
    with pytest.raises(RuntimeError, match=r"context\.stages\.0\.query_project\.conv\.weight"):
        model.load_state_dict(sd, strict=True)


def test_wrong_class_count_is_a_shape_error():
    model = create_model("seglstm_upernet_s", num_classes=6)
    with pytest.raises(RuntimeError, match=r"decode_head\.conv_seg\.weight.*size mismatch|size mismatch.*conv_seg"):
        model.load_state_dict(random_state_dict(seed_shapes("seglstm_upernet_s")), strict=True)
