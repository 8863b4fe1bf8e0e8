"""An exported ONNX segmentor behind the interface :class:`ScenePredictor` expects of a model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from seglstm.config import META_KEY
from seglstm.inference.scene.errors import SceneError


class OnnxSegmentor:
    """``(B, C, tile, tile)`` float tensor -> logits, through onnxruntime (CUDA when the device is CUDA and
    the CUDA provider is installed, else CPU)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from seglstm.utils.optional import require

        ort = require("onnxruntime", "--onnx (running an ONNX model)")

        self.path = Path(path)
        if not self.path.is_file():
            raise SceneError(f"--onnx {self.path} does not exist or is not a file")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable models
            raise SceneError(f"--onnx {self.path} is not a readable ONNX model: {err}") from err
        raw = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if raw is None:
            raise SceneError(f"--onnx {self.path} carries no {META_KEY} metadata: write it with `seglstm export`")
        self.meta = json.loads(raw)
        self.input_name = self.session.get_inputs()[0].name
        self.tile = int(self.meta["tile"])

    def to(self, device: torch.device) -> OnnxSegmentor:
        from seglstm.utils.optional import require

        ort = require("onnxruntime", "--onnx (running an ONNX model)")

        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            self.session.set_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
        return self

    def eval(self) -> OnnxSegmentor:
        return self

    def digest(self) -> str:
        """The file's SHA-256: what ``--resume`` compares."""
        h = hashlib.sha256()
        with open(self.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != (self.tile, self.tile):
            raise SceneError(
                f"--onnx {self.path} was exported for {self.tile}x{self.tile} tiles; got windows of "
                f"{tuple(x.shape[2:])} (a scene smaller than the tile? export a smaller --tile)"
            )
        batch = np.ascontiguousarray(x.float().cpu().numpy())
        fixed = self.session.get_inputs()[0].shape[0]
        if not isinstance(fixed, int) or fixed == len(batch):
            (logits,) = self.session.run(None, {self.input_name: batch})
            return torch.from_numpy(logits).to(x.device)
        # a program exported with a fixed batch: run full chunks, the last one padded with its own tiles
        out = []
        for b0 in range(0, len(batch), fixed):
            chunk = batch[b0 : b0 + fixed]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - len(chunk), axis=0)])
            out.append(self.session.run(None, {self.input_name: padded})[0][: len(chunk)])
        return torch.from_numpy(np.concatenate(out)).to(x.device)
