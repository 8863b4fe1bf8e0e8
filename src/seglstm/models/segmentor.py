"""The encoder-decoder segmentor (mmseg's ``EncoderDecoder``), its losses and its inference modes.

Attribute names ``backbone`` / ``neck`` / ``decode_head`` / ``auxiliary_head`` are mmseg's: checkpoint keys
start with them. Inference follows mmseg's ``test_cfg``: ``whole`` runs the image at once, ``slide`` runs
overlapping crops (windows placed as mmseg's ``slide_inference`` places them, the last one shifted back
inside the image) and averages logits by a count map; test-time augmentation runs several scales and an
optional horizontal flip.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from seglstm.models.heads.base import BaseDecodeHead, resize

__all__ = [
    "EncoderDecoder",
    "cross_entropy",
    "dice_loss",
    "lovasz_softmax",
    "slide_inference",
    "slide_windows",
    "split_segmentor_options",
]

TEST_CFG_DEFAULTS: dict[str, Any] = dict(
    mode="whole", crop_size=(512, 512), stride=(341, 341), scales=None, flip=False, merge="probs"
)


# ----------------------------------------------------------------------------------------------------------
# losses


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses run in float32 even under autocast (as mmseg's ``force_fp32``); float64 stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = 255,
    avg_non_ignore: bool = False,
) -> torch.Tensor:
    """Pixel-wise cross-entropy reduced as mmseg's ``CrossEntropyLoss`` reduces it.

    Ignored pixels contribute 0; the sum is divided by the number of all pixels (mmseg's default,
    ``avg_non_ignore=False``, which the seed trained with) or by the number of non-ignored pixels.
    Class weights scale each pixel's loss but not the divisor (unlike ``F.cross_entropy``'s mean).
    """
    logits = _at_least_fp32(logits)
    if class_weight is not None:
        class_weight = class_weight.to(logits.dtype)
    loss = F.cross_entropy(logits, target, weight=class_weight, reduction="none", ignore_index=ignore_index)
    if avg_non_ignore:
        return loss.sum() / (target != ignore_index).sum().clamp_min(1)
    return loss.mean()


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, smooth: float = 1.0
) -> torch.Tensor:
    """Soft multi-class Dice loss: 1 - mean over classes of (2 I + s) / (P + L + s) on softmax
    probabilities, summed over the batch, ignored pixels excluded."""
    probs = _at_least_fp32(logits).softmax(dim=1)
    k = probs.shape[1]
    valid = target != ignore_index
    onehot = F.one_hot(torch.where(valid, target, 0), k).permute(0, 3, 1, 2).to(probs.dtype)
    mask = valid.unsqueeze(1).to(probs.dtype)
    probs, onehot = probs * mask, onehot * mask
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1.0 - ((2.0 * inter + smooth) / (denom + smooth)).mean()


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors (Berman et al. 2018)."""
    gts = gt_sorted.sum()
    inter = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - inter / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Lovasz-Softmax loss (Berman et al. 2018) over all valid pixels of the batch, averaged over the
    classes present in ``target``; a direct surrogate of mIoU."""
    k = logits.shape[1]
    probs = _at_least_fp32(logits).softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, k)
    labels = target.reshape(-1)
    valid = labels != ignore_index
    probs, labels = probs[valid], labels[valid]
    if labels.numel() == 0:
        return logits.sum() * 0.0
    losses = []
    for c in torch.unique(labels).tolist():
        fg = (labels == c).to(probs.dtype)
        errors, order = (fg - probs[:, c]).abs().sort(descending=True)
        losses.append(torch.dot(errors, _lovasz_grad(fg[order])))
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------------------------------------
# sliding-window inference


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or any(not isinstance(p, int) or p < 1 for p in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {v!r}")
    return int(pair[0]), int(pair[1])


def slide_windows(
    height: int, width: int, crop_size: int | Sequence[int], stride: int | Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """Windows ``(y1, y2, x1, x2)`` that mmseg's slide inference visits on a ``height x width`` image.

    Windows start every ``stride`` pixels; the last one in each direction is shifted back so that it ends
    at the border. Windows are smaller than the crop only where the image is.
    """
    (ch, cw), (sh, sw) = _pair(crop_size, "crop_size"), _pair(stride, "stride")
    if sh > ch or sw > cw:
        raise ValueError(f"stride {(sh, sw)} larger than crop_size {(ch, cw)} would leave pixels unvisited")
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            windows.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return windows


def slide_inference(
    predict: Callable[[torch.Tensor], torch.Tensor],
    img: torch.Tensor,
    num_classes: int,
    crop_size: int | Sequence[int] = 512,
    stride: int | Sequence[int] = 341,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``predict`` (crop -> logits at crop size) over overlapping windows and average the logits.

    An image smaller than the crop is zero-padded at the bottom/right to the crop size first, so every
    window the model sees has the crop's size; the padding is cropped off the result.

    Returns:
        ``(logits (B, K, H, W), count (1, 1, H, W))``, ``count`` being how many windows saw each pixel.
    """
    if img.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) image batch, got shape {tuple(img.shape)}")
    (ch, cw) = _pair(crop_size, "crop_size")
    b, _, h, w = img.shape
    padded = F.pad(img, (0, max(cw - w, 0), 0, max(ch - h, 0)))
    ph, pw = padded.shape[2:]
    windows = slide_windows(ph, pw, (ch, cw), stride)
    logits = img.new_zeros((b, num_classes, ph, pw), dtype=torch.float32)
    count = img.new_zeros((1, 1, ph, pw), dtype=torch.float32)
    for y1, y2, x1, x2 in tqdm(windows, desc="slide", disable=not progress, leave=False):
        out = predict(padded[:, :, y1:y2, x1:x2])
        if out.shape != (b, num_classes, y2 - y1, x2 - x1):
            raise ValueError(
                f"predict returned {tuple(out.shape)} for a {y2 - y1}x{x2 - x1} crop; expected "
                f"{(b, num_classes, y2 - y1, x2 - x1)}"
            )
        logits[:, :, y1:y2, x1:x2] += out.float()
        count[:, :, y1:y2, x1:x2] += 1
    return (logits / count)[:, :, :h, :w], count[:, :, :h, :w]


# ----------------------------------------------------------------------------------------------------------
# segmentor


class EncoderDecoder(nn.Module):
    """Encoder -> optional neck -> decode head (+ auxiliary head for the loss), mmseg's segmentor.

    Args:
        backbone: module mapping (B, 3, H, W) to a list of NCHW maps.
        decode_head: a ``BaseDecodeHead``; its ``num_classes`` is the segmentor's.
        neck: optional module mapping the backbone's list of maps to another list.
        auxiliary_head: optional head trained alongside (ignored at inference).
        decode_loss_weight / aux_loss_weight: weights of the two cross-entropy terms (seed: 1.0 / 0.4).
        class_weight: optional per-class cross-entropy weights (length ``num_classes``).
        dice_weight / lovasz_weight: weights of optional Dice and Lovasz-Softmax terms on the decode head.
        ignore_index: label value excluded from every loss (the seed pads with 255).
        avg_non_ignore: divide the cross-entropy by the non-ignored pixel count instead of mmseg's default
            all-pixel count.
        test_cfg: default inference settings (keys of ``TEST_CFG_DEFAULTS``: mode, crop_size, stride,
            scales, flip, merge).
        size_divisor: pad inputs at the bottom/right to a multiple of this (the encoder's patch size) and
            crop the logits back, so that logits stay aligned with the pixels for any H, W (resizing the
            ceil(H/16) grid straight to H would stretch it). ``None`` runs the input as it is.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: BaseDecodeHead,
        neck: nn.Module | None = None,
        auxiliary_head: BaseDecodeHead | None = None,
        *,
        decode_loss_weight: float = 1.0,
        aux_loss_weight: float = 0.4,
        class_weight: Sequence[float] | None = None,
        dice_weight: float = 0.0,
        lovasz_weight: float = 0.0,
        ignore_index: int = 255,
        avg_non_ignore: bool = False,
        test_cfg: Mapping[str, Any] | None = None,
        size_divisor: int | None = None,
    ) -> None:
        super().__init__()
        if size_divisor is not None and (not isinstance(size_divisor, int) or size_divisor < 1):
            raise ValueError(f"size_divisor must be a positive int or None, got {size_divisor!r}")
        self.size_divisor = size_divisor
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.num_classes = decode_head.num_classes
        self.align_corners = decode_head.align_corners
        if auxiliary_head is not None and auxiliary_head.num_classes != self.num_classes:
            raise ValueError(
                f"auxiliary_head predicts {auxiliary_head.num_classes} classes, decode_head {self.num_classes}"
            )
        for name, value in (("decode_loss_weight", decode_loss_weight), ("aux_loss_weight", aux_loss_weight),
                            ("dice_weight", dice_weight), ("lovasz_weight", lovasz_weight)):
            if float(value) < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        self.decode_loss_weight, self.aux_loss_weight = float(decode_loss_weight), float(aux_loss_weight)
        self.dice_weight, self.lovasz_weight = float(dice_weight), float(lovasz_weight)
        self.ignore_index, self.avg_non_ignore = int(ignore_index), bool(avg_non_ignore)
        if class_weight is not None:
            weights = torch.as_tensor(list(class_weight), dtype=torch.float32)
            if weights.shape != (self.num_classes,) or bool((weights < 0).any()):
                raise ValueError(
                    f"class_weight must hold {self.num_classes} non-negative numbers, got {list(class_weight)!r}"
                )
            self.register_buffer("class_weight", weights, persistent=False)
        else:
            self.class_weight = None
        self.test_cfg = self._merge_test_cfg(TEST_CFG_DEFAULTS, test_cfg or {})

    # -- forward -------------------------------------------------------------------------------------------

    def _check_img(self, img: torch.Tensor) -> None:
        if not isinstance(img, torch.Tensor) or img.ndim != 4 or not img.is_floating_point():
            got = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f"expected a float (B, C, H, W) image batch, got {got}")

    def extract_feat(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Backbone maps, passed through the neck when there is one."""
        feats = self.backbone(img)
        return list(self.neck(feats)) if self.neck is not None else list(feats)

    def _pad(self, img: torch.Tensor) -> torch.Tensor:
        """Zero-pad bottom/right to a multiple of ``size_divisor`` (mmseg's data preprocessor does the same)."""
        d = self.size_divisor
        if not d:
            return img
        return F.pad(img, (0, (-img.shape[3]) % d, 0, (-img.shape[2]) % d))

    def _head_logits(self, head: BaseDecodeHead, feats: list[torch.Tensor], padded: torch.Tensor,
                     size: Sequence[int]) -> torch.Tensor:
        """Head logits upsampled to the padded input, then cropped to ``size``: a feature cell keeps
        covering the same pixels as in the backbone, whatever the image size."""
        logits = resize(head(feats), padded.shape[2:], self.align_corners)
        return logits[:, :, : size[0], : size[1]]

    def encode_decode(self, img: torch.Tensor) -> torch.Tensor:
        """Decode-head logits upsampled bilinearly to the input size, (B, K, H, W)."""
        self._check_img(img)
        padded = self._pad(img)
        return self._head_logits(self.decode_head, self.extract_feat(padded), padded, img.shape[2:])

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.encode_decode(img)

    # -- training ------------------------------------------------------------------------------------------

    def _check_mask(self, mask: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        if mask.ndim == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.ndim != 3 or mask.shape[0] != img.shape[0] or mask.shape[1:] != img.shape[2:]:
            raise ValueError(
                f"mask must be (B, H, W) or (B, 1, H, W) with the image's B, H, W {(img.shape[0], *img.shape[2:])}, "
                f"got {tuple(mask.shape)}"
            )
        if mask.is_floating_point() or mask.dtype == torch.bool:
            raise ValueError(f"mask must hold integer class indices, got dtype {mask.dtype}")
        mask = mask.long()
        bad = ((mask < 0) | (mask >= self.num_classes)) & (mask != self.ignore_index)
        if bool(bad.any()):
            values = torch.unique(mask[bad])[:10].tolist()
            raise ValueError(
                f"mask holds values {values} outside 0..{self.num_classes - 1} and ignore_index "
                f"{self.ignore_index}"
            )
        return mask

    def loss_and_logits(self, img: torch.Tensor, mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Losses (see ``loss``) and the decode-head logits at the mask's size, from one forward pass."""
        self._check_img(img)
        target = self._check_mask(mask, img)
        padded = self._pad(img)
        feats = self.extract_feat(padded)
        logits = self._head_logits(self.decode_head, feats, padded, target.shape[1:])
        losses = {
            "loss_decode": self.decode_loss_weight
            * cross_entropy(logits, target, self.class_weight, self.ignore_index, self.avg_non_ignore)
        }
        if self.auxiliary_head is not None:
            aux = self._head_logits(self.auxiliary_head, feats, padded, target.shape[1:])
            losses["loss_aux"] = self.aux_loss_weight * cross_entropy(
                aux, target, self.class_weight, self.ignore_index, self.avg_non_ignore
            )
        if self.dice_weight > 0:
            losses["loss_dice"] = self.dice_weight * dice_loss(logits, target, self.ignore_index)
        if self.lovasz_weight > 0:
            losses["loss_lovasz"] = self.lovasz_weight * lovasz_softmax(logits, target, self.ignore_index)
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses, logits

    def loss(self, img: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses: ``loss`` (the total to backpropagate), ``loss_decode`` (weighted CE on the decode
        head), ``loss_aux`` (0.4 x CE on the auxiliary head, when there is one) and, when enabled,
        ``loss_dice`` / ``loss_lovasz``. Every component is reported already weighted, as mmseg logs them.
        """
        return self.loss_and_logits(img, mask)[0]

    # -- inference -----------------------------------------------------------------------------------------

    @staticmethod
    def _merge_test_cfg(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(update) - set(TEST_CFG_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown test_cfg keys {unknown}; known: {sorted(TEST_CFG_DEFAULTS)}")
        cfg = {**base, **{k: v for k, v in update.items() if v is not None}}
        if cfg["mode"] not in ("whole", "slide"):
            raise ValueError(f"test_cfg mode must be 'whole' or 'slide', got {cfg['mode']!r}")
        if cfg["merge"] not in ("probs", "logits"):
            raise ValueError(f"test_cfg merge must be 'probs' or 'logits', got {cfg['merge']!r}")
        if cfg["scales"] is not None:
            cfg["scales"] = tuple(float(s) for s in cfg["scales"])
            if not cfg["scales"] or any(s <= 0 for s in cfg["scales"]):
                raise ValueError(f"test_cfg scales must be positive numbers, got {cfg['scales']!r}")
        cfg["crop_size"], cfg["stride"] = _pair(cfg["crop_size"], "crop_size"), _pair(cfg["stride"], "stride")
        return cfg

    def _predict(self, img: torch.Tensor, cfg: Mapping[str, Any], progress: bool) -> torch.Tensor:
        if cfg["mode"] == "whole":
            return self.encode_decode(img).float()
        return slide_inference(self.encode_decode, img, self.num_classes, cfg["crop_size"], cfg["stride"], progress)[0]

    @torch.no_grad()
    def inference(
        self,
        img: torch.Tensor,
        mode: str | None = None,
        crop_size: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        scales: Sequence[float] | None = None,
        flip: bool | None = None,
        merge: str | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Logits (B, K, H, W) at the input size, by ``whole`` or ``slide`` inference, with optional TTA.

        Arguments left ``None`` come from ``self.test_cfg``. The module's train/eval state is left as is:
        call ``model.eval()`` first so BatchNorm and dropout behave as at test time.

        Args:
            mode: ``whole`` (one pass) or ``slide`` (``crop_size`` windows every ``stride`` pixels).
            scales: test-time scales; the image is resized by each, predicted, and the logits resized back.
            flip: also predict the horizontally flipped image (its prediction flipped back).
            merge: how TTA combines its predictions: ``"probs"`` averages softmax probabilities as mmseg's
                ``SegTTAModel`` does and returns their log (log-probabilities, usable as logits);
                ``"logits"`` averages raw logits. Without TTA the raw logits are returned either way.
            progress: show a progress bar over slide windows.
        """
        self._check_img(img)
        cfg = self._merge_test_cfg(
            self.test_cfg,
            dict(mode=mode, crop_size=crop_size, stride=stride, scales=scales, flip=flip, merge=merge),
        )
        scale_list = cfg["scales"] or (1.0,)
        flips = (False, True) if cfg["flip"] else (False,)
        if scale_list == (1.0,) and flips == (False,):
            return self._predict(img, cfg, progress)
        h, w = img.shape[2:]
        total: torch.Tensor | None = None
        for s in scale_list:
            scaled = img if s == 1.0 else resize(img, (max(1, round(h * s)), max(1, round(w * s))))
            for flipped in flips:
                out = self._predict(scaled.flip(-1) if flipped else scaled, cfg, progress)
                out = resize(out.flip(-1) if flipped else out, (h, w), self.align_corners)
                term = out.softmax(dim=1) if cfg["merge"] == "probs" else out
                total = term if total is None else total + term
        mean = total / (len(scale_list) * len(flips))  # type: ignore[operator]
        return mean.clamp_min(torch.finfo(mean.dtype).tiny).log() if cfg["merge"] == "probs" else mean

    def no_weight_decay(self) -> set[str]:
        """Parameter names the optimizer should not decay (the backbone's position table and the like)."""
        inner = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in inner()} if callable(inner) else set()


def split_segmentor_options(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split preset overrides into :class:`EncoderDecoder`'s keyword-only options (loss weights,
    ``ignore_index``, ``test_cfg``, ``size_divisor`` ...) and the rest (head and encoder arguments), so
    every preset builder accepts the same segmentor options without listing them."""
    names = {
        p.name for p in inspect.signature(EncoderDecoder.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY
    }
    options = {k: v for k, v in overrides.items() if k in names}
    rest = {k: v for k, v in overrides.items() if k not in names}
    return options, rest
