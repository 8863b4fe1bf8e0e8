"""``seglstm predict-scene --out-dir DIR IN...``: the command-line side of mapping a region (see
:mod:`seglstm.inference.scene.region`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seglstm.inference.scene import InputOptions, ScenePredictor, VectorSpec
from seglstm.inference.scene.region import Launch, SceneOutputs, run_region

PROG = "seglstm predict-scene"
# arguments that say where things are or how this rank runs, not what a scene's products are
_NOT_SETTINGS = {"paths", "out_dir", "input", "output", "quiet", "device", "ckpt", "onnx", "config", "unsafe_load",
                 "resume", "allow_no_crs"}  # fmt: skip


def run_region_cli(
    predictor: ScenePredictor,
    args: argparse.Namespace,
    vector: VectorSpec | None,
    options: InputOptions,
    bands: list[int] | None,
    scale,
    launch: Launch,
) -> int:
    """Run this rank's share of the region; 0 when every scene is done, 1 when some failed (all ranks agree)."""
    outputs = SceneOutputs(probs=args.probs, preview=args.preview, vector=vector)
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_SETTINGS}
    settings.update(device_type=predictor.device.type, autocast=str(predictor.amp_dtype))
    predict_kw = dict(bands=bands, scale=scale, preview_size=args.preview_size, allow_no_crs=args.allow_no_crs,
                      cog=args.cog, input_options=options)  # fmt: skip
    result = run_region(predictor, args.paths, Path(args.out_dir), outputs=outputs, predict_kw=predict_kw,
                        settings=settings, launch=launch)  # fmt: skip
    failed = result.failed
    if launch.rank == 0:
        print(f"{PROG}: {len(result.records)} scene(s): {len(result.records) - len(failed)} done, {len(failed)} "
              f"failed, {result.ran} run now; manifest {result.manifest}", file=sys.stderr)  # fmt: skip
        for record in failed:
            print(f"{PROG}: failed: {record.name} ({record.input}): {record.error}", file=sys.stderr)
        if failed:
            print(f"{PROG}: rerun the same command to retry the failed scenes (done ones are skipped)",
                  file=sys.stderr)  # fmt: skip
    return 1 if failed else 0
