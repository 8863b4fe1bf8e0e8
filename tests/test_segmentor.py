"""EncoderDecoder: losses, whole/slide/TTA inference, and every seglstm_* preset end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seglstm.models import seglstm as _presets  # noqa: F401  (registers the seglstm_* presets)
from seglstm.models.heads import FCNHead
from seglstm.models.registry import create_model, list_models
from seglstm.models.segmentor import (
    EncoderDecoder,
    cross_entropy,
    dice_loss,
    lovasz_softmax,
    slide_inference,
    slide_windows,
)

HEADS = ("upernet", "ann", "apcnet", "deeplabv3", "deeplabv3plus")
SEED_PRESETS = [f"seglstm_{h}_{s}{lay}" for h in HEADS for s in "tsb" for lay in ("", "_44124")]
K = 7


class ToyBackbone(nn.Module):
    """A conv returning one full-resolution map: its receptive field is kernel_size pixels."""

    def __init__(self, channels: int = 8, kernel_size: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, kernel_size, padding=kernel_size // 2)
        self.out_channels = [channels]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.conv(x)]


def toy_segmentor(kernel_size: int = 1, **kwargs) -> EncoderDecoder:
    torch.manual_seed(0)
    head = FCNHead(8, 8, num_classes=K, in_index=0, num_convs=0, dropout_ratio=0.0)
    return EncoderDecoder(ToyBackbone(8, kernel_size), head, **kwargs).eval()


# ----------------------------------------------------------------------------------------------------------
# losses


def test_cross_entropy_reduces_as_mmseg():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 3, 5), generator=g)
    target[0, 0, :3] = 255
    valid = target != 255
    logp = logits.log_softmax(1)
    nll = -logp.gather(1, torch.where(valid, target, 0)[:, None])[:, 0] * valid
    w = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float32)
    wpix = w.double()[torch.where(valid, target, 0)] * valid
    # mmseg default: ignored pixels count in the divisor
    torch.testing.assert_close(cross_entropy(logits, target).double(), nll.sum() / target.numel())
    torch.testing.assert_close(cross_entropy(logits, target, avg_non_ignore=True).double(), nll.sum() / valid.sum())
    torch.testing.assert_close(
        cross_entropy(logits, target, class_weight=w).double(), (nll * wpix).sum() / target.numel(), rtol=1e-6, atol=0
    )


def test_dice_loss_hand_computed():
    # two classes, four pixels, one ignored; probabilities chosen by logits (log p)
    p = torch.tensor([[0.9, 0.2, 0.6, 0.5]])  # class-0 probability per pixel
    logits = torch.stack([p.log(), (1 - p).log()], dim=1).reshape(1, 2, 1, 4)
    target = torch.tensor([[[0, 1, 0, 255]]])
    # class 0: I = .9 + .6, P = .9 + .2 + .6, L = 2 ; class 1: I = .8, P = .1 + .8 + .4, L = 1
    d0 = (2 * 1.5 + 1) / (1.7 + 2 + 1)
    d1 = (2 * 0.8 + 1) / (1.3 + 1 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)


def test_lovasz_softmax_equals_jaccard_loss_on_hard_predictions():
    """On vertices of the cube (probabilities 0/1) the Lovasz extension is the set function itself:
    mean over present classes of 1 - IoU."""
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 4, (2, 6, 7), generator=g)
    target[1, :2] = 255
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target, torch.randint(0, 4, target.shape,
                                                                                          generator=g))
    logits = F.one_hot(pred.clamp(max=3), 4).permute(0, 3, 1, 2).double() * 60.0
    valid = target != 255
    losses = []
    for c in torch.unique(target[valid]).tolist():
        inter = ((pred == c) & (target == c) & valid).sum().item()
        union = (((pred == c) | (target == c)) & valid).sum().item()
        losses.append(1 - inter / union)
    assert lovasz_softmax(logits, target).item() == pytest.approx(sum(losses) / len(losses), abs=1e-9)


def test_loss_dict_is_decode_ce_plus_weighted_aux_ce():
    torch.manual_seed(0)
    backbone = ToyBackbone(8, 3)
    head = FCNHead(8, 6, num_classes=K, in_index=0, num_convs=1, dropout_ratio=0.0)
    aux = FCNHead(8, 4, num_classes=K, in_index=0, num_convs=1, dropout_ratio=0.0)
    model = EncoderDecoder(backbone, head, auxiliary_head=aux, dice_weight=0.3, lovasz_weight=0.2).eval()
    img = torch.randn(2, 3, 10, 12)
    mask = torch.randint(0, K, (2, 10, 12))
    mask[:, 0] = 255
    losses = model.loss(img, mask)
    feats = backbone(img)
    ce_d = cross_entropy(head(feats), mask)
    ce_a = cross_entropy(aux(feats), mask)
    torch.testing.assert_close(losses["loss_decode"], ce_d)
    torch.testing.assert_close(losses["loss_aux"], 0.4 * ce_a)
    torch.testing.assert_close(losses["loss_dice"], 0.3 * dice_loss(head(feats), mask))
    torch.testing.assert_close(losses["loss_lovasz"], 0.2 * lovasz_softmax(head(feats), mask))
    torch.testing.assert_close(
        losses["loss"], ce_d + 0.4 * ce_a + losses["loss_dice"] + losses["loss_lovasz"]
    )
    assert "loss_aux" not in EncoderDecoder(backbone, head).eval().loss(img, mask)


def test_bad_masks_and_images_are_rejected():
    model = toy_segmentor()
    img = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"values \[7, 9\] outside 0..6"):
        model.loss(img, torch.tensor([[[0, 7, 9, 255]] * 4]))
    with pytest.raises(ValueError, match="integer class indices"):
        model.loss(img, torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        model.loss(img, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"image's B, H, W \(1, 4, 4\)"):
        model.loss(img, torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="class_weight"):
        toy_segmentor(class_weight=[1.0, 2.0])


# ----------------------------------------------------------------------------------------------------------
# inference


def test_slide_windows_match_hand_computed_grid():
    # 700 x 900, crop 256, stride 171: rows start 0,171,342 then the last is shifted back to end at 700
    rows = [(0, 256), (171, 427), (342, 598), (444, 700)]
    cols = [(0, 256), (171, 427), (342, 598), (513, 769), (644, 900)]
    assert slide_windows(700, 900, 256, 171) == [(y1, y2, x1, x2) for y1, y2 in rows for x1, x2 in cols]
    assert slide_windows(100, 300, 256, 171) == [(0, 100, 0, 256), (0, 100, 44, 300)]
    with pytest.raises(ValueError, match="unvisited"):
        slide_windows(700, 900, 256, 300)


def test_slide_equals_whole_for_a_pointwise_model_and_counts_every_window():
    model = toy_segmentor(kernel_size=1)
    img = torch.randn(1, 3, 700, 900)
    with torch.no_grad():
        whole = model.inference(img, mode="whole")
        slide, count = slide_inference(model.encode_decode, img, K, crop_size=256, stride=171)
    assert whole.shape == slide.shape == (1, K, 700, 900)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.inference(img, mode="slide", crop_size=256, stride=171), whole,
                               rtol=1e-5, atol=1e-5)
    expected = torch.zeros(700, 900)
    for y1, y2, x1, x2 in slide_windows(700, 900, 256, 171):
        expected[y1:y2, x1:x2] += 1
    assert torch.equal(count[0, 0], expected)
    assert count.min() == 1 and count.max() == 4  # no pixel unseen; corners of four windows overlap


def test_slide_pads_images_smaller_than_the_crop():
    model = toy_segmentor(kernel_size=3)
    img = torch.randn(2, 3, 90, 300)
    seen = []

    def predict(crop):
        seen.append(tuple(crop.shape[2:]))
        return model.encode_decode(crop)

    with torch.no_grad():
        out, count = slide_inference(predict, img, K, crop_size=128, stride=100)
        whole = model.encode_decode(img)
    assert set(seen) == {(128, 128)}  # every window has the crop's size
    assert out.shape == (2, K, 90, 300) and count.min() >= 1
    # away from window borders a 3x3 model sees the same pixels in a crop as in the whole image
    torch.testing.assert_close(out[..., 1:88, 1:99], whole[..., 1:88, 1:99], rtol=1e-5, atol=1e-5)


def test_tta_merges_flip_and_scales():
    model = toy_segmentor(kernel_size=3)
    img = torch.randn(1, 3, 20, 24)
    with torch.no_grad():
        f = model.encode_decode(img)
        ff = model.encode_decode(img.flip(-1)).flip(-1)
        half = F.interpolate(model.encode_decode(F.interpolate(img, size=(10, 12), mode="bilinear")),
                             size=(20, 24), mode="bilinear")
        got_logits = model.inference(img, flip=True, merge="logits")
        got_probs = model.inference(img, scales=(0.5, 1.0), merge="probs")
    torch.testing.assert_close(got_logits, (f + ff) / 2)
    torch.testing.assert_close(got_probs, ((half.softmax(1) + f.softmax(1)) / 2).log())


def test_tta_with_flip_gives_symmetric_prediction_on_symmetric_input():
    model = create_model("seglstm_upernet_t", num_classes=K, depths=(1, 1, 1, 1), channels=32,
                         aux_cfg=dict(channels=16)).eval()
    torch.manual_seed(1)
    half = torch.randn(1, 3, 64, 48)
    img = torch.cat([half, half.flip(-1)], dim=-1)  # 64 x 96, mirror-symmetric
    assert torch.equal(img, img.flip(-1))
    with torch.no_grad():
        plain = model.inference(img)
        tta = model.inference(img, scales=(0.75, 1.0, 1.25), flip=True)
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-3)  # the model itself is not symmetric
    torch.testing.assert_close(tta, tta.flip(-1), rtol=1e-4, atol=1e-4)


def test_logits_stay_aligned_for_sizes_off_the_patch_grid():
    """A 100 x 120 image runs on a 7 x 8 token grid covering 112 x 128 pixels; its logits must be those of
    the zero-padded image, cropped, not the grid stretched over 100 x 120."""
    model = create_model("seglstm_deeplabv3_t", num_classes=K, depths=(1, 1, 1, 1), channels=32,
                         auxiliary=False).eval()
    assert model.size_divisor == 16
    img = torch.randn(1, 3, 100, 120)
    with torch.no_grad():
        out = model.inference(img)
        ref = model.inference(F.pad(img, (0, 8, 0, 12)))[..., :100, :120]
        stretched = F.interpolate(model.decode_head(model.extract_feat(img)), size=(100, 120), mode="bilinear")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, stretched, atol=1e-3)


def test_test_cfg_defaults_and_errors():
    model = toy_segmentor(test_cfg=dict(mode="slide", crop_size=(16, 16), stride=(8, 8)))
    assert model.test_cfg["mode"] == "slide" and model.test_cfg["crop_size"] == (16, 16)
    img = torch.randn(1, 3, 30, 40)
    torch.testing.assert_close(model.inference(img), model.inference(img, mode="whole"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown test_cfg keys"):
        toy_segmentor(test_cfg=dict(crop=(16, 16)))
    with pytest.raises(ValueError, match="'whole' or 'slide'"):
        model.inference(img, mode="sliding")


# ----------------------------------------------------------------------------------------------------------
# presets


def test_every_seed_preset_is_registered():
    names = set(list_models())
    assert set(SEED_PRESETS) <= names
    assert {"seglstm_fcn_t", "seglstm_fcn_s", "seglstm_fcn_b"} <= names


def fit_a_few_steps(model: EncoderDecoder, steps: int = 4) -> list[float]:
    torch.manual_seed(0)
    img = torch.randn(2, 3, 128, 160)
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(160), indexing="ij")
    mask = ((yy // 32 + xx // 40) % K).expand(2, -1, -1).clone()  # learnable blocks
    mask[:, :8] = 255
    model.train()
    logits = model(img)
    assert logits.shape == (2, K, 128, 160)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        losses = model.loss(img, mask)
        losses["loss"].backward()
        history.append(losses["loss"].item())
        opt.step()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    return history


FAST = [n for n in SEED_PRESETS if n.split("_")[2] == "t"] + ["seglstm_fcn_t"]


@pytest.mark.parametrize("name", FAST)
def test_tiny_preset_trains(name):
    """Head wiring at small cost: t width, one block per stage (two in stage 3 for 44124), narrow heads."""
    depths = (1, 1, 2, 1) if name.endswith("44124") else (1, 1, 1, 1)
    model = create_model(name, num_classes=K, depths=depths, channels=64, aux_cfg=dict(channels=32))
    history = fit_a_few_steps(model)
    assert history[-1] < history[0], history


# pyramid levels each head reads (with the auxiliary head's level 2): only these are built
NECK_LEVELS = {"upernet": [0, 1, 2, 3], "ann": [2, 3], "apcnet": [2, 3], "deeplabv3": [2, 3],
               "deeplabv3plus": [0, 2, 3]}


@pytest.mark.parametrize("head", HEADS)
def test_multilevel_neck_preset_trains(head):
    model = create_model(f"seglstm_{head}_t", num_classes=K, neck="multilevel", neck_channels=48,
                         depths=(1, 1, 1, 1), channels=64, aux_cfg=dict(channels=32))
    assert [f["reduction"] for f in model.neck.feature_info] == [4, 8, 16, 32]
    assert model.neck.out_indices == NECK_LEVELS[head]
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(1, 3, 128, 160))
    shapes = [(48, 32, 40), (48, 16, 20), (48, 8, 10), (48, 4, 5)]
    assert [None if f is None else tuple(f.shape[1:]) for f in feats] == [
        shapes[i] if i in NECK_LEVELS[head] else None for i in range(4)
    ]
    history = fit_a_few_steps(model)
    assert history[-1] < history[0], history


def test_overrides_reach_head_and_encoder():
    model = create_model("seglstm_deeplabv3_t", num_classes=3, depths=(1, 2, 1, 1), channels=40,
                         dilations=(1, 2), img_size=256, auxiliary=False)
    assert model.decode_head.channels == 40 and model.decode_head.dilations == (1, 2)
    assert len(model.backbone.blocks2) == 2 and model.backbone.pos_embed.embed.shape[1:3] == (16, 16)
    assert model.auxiliary_head is None and model.decode_head.in_channels == 192
    with pytest.raises(ValueError, match="neck must be one of"):
        create_model("seglstm_ann_t", num_classes=3, neck="fpn")
    with pytest.raises(TypeError, match="no_such_option"):
        create_model("seglstm_ann_t", num_classes=3, no_such_option=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SEED_PRESETS if n.split("_")[2] == "s"])
def test_full_size_s_preset_trains(name):
    history = fit_a_few_steps(create_model(name, num_classes=K), steps=3)
    assert history[-1] < history[0], history


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SEED_PRESETS if n.split("_")[2] in "tb"] + ["seglstm_fcn_b"])
def test_full_size_preset_forward_backward(name):
    model = create_model(name, num_classes=K).train()
    img = torch.randn(2, 3, 128, 160)
    mask = torch.randint(0, K, (2, 128, 160))
    losses = model.loss(img, mask)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert model(img).shape == (2, K, 128, 160)


@pytest.mark.parametrize("preset", ["seglstm_upernet_t", "deeplabv3plus_r18"])
def test_presets_route_segmentor_head_and_encoder_options(preset):
    from seglstm.models.segmentor import split_segmentor_options

    options, rest = split_segmentor_options({"ignore_index": 7, "aux_loss_weight": 0.25, "dropout_ratio": 0.0, "x": 1})
    assert options == {"ignore_index": 7, "aux_loss_weight": 0.25} and rest == {"dropout_ratio": 0.0, "x": 1}
    tiny = {"depths": [1, 1, 1, 1], "embed_dim": 32} if preset.startswith("seglstm") else {}
    model = create_model(preset, num_classes=3, ignore_index=7, aux_loss_weight=0.25, dice_weight=0.5,
                         test_cfg={"mode": "slide"}, dropout_ratio=0.0, **tiny)  # fmt: skip
    assert (model.ignore_index, model.aux_loss_weight, model.dice_weight) == (7, 0.25, 0.5)
    assert model.test_cfg["mode"] == "slide" and model.decode_head.dropout_ratio == 0.0
    with pytest.raises(TypeError, match="no_such_option"):
        create_model(preset, num_classes=3, no_such_option=1, **tiny)
