"""``seglstm check-data CONFIG``: build every split a training config uses, read every item, print a
per-class pixel histogram and per-band statistics, and exit 1 listing the problems found."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from seglstm.errors import SeglstmError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seglstm check-data",
        description="Validate the dataset of a LightningCLI config (its data.init_args for "
        "seglstm.data.SegDataModule): pairing, sizes, label range and readability of every file.",
    )
    p.add_argument("config", type=Path, help="YAML config with a data: section")
    p.add_argument(
        "--split",
        action="append",
        help="check only this split (repeatable; default: train, val and the test split; 'predict' checks "
        "predict_root)",
    )
    p.add_argument("--workers", type=int, default=0, help="loader processes (default 0)")
    p.add_argument(
        "--stats",
        action="store_true",
        help="print the per-band mean/std of the train split (or --split) as data.mean/data.std config lines",
    )
    p.add_argument(
        "--previews", type=Path, default=Path("runs/check-data"),
        help="dataset 'scenes': folder for one preview PNG per scene (default runs/check-data)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.epilog = "--data.KEY VALUE overrides one data setting of the config, as for seglstm fit"
    return p


def data_init_args(config: Path) -> dict[str, Any]:
    """The SegDataModule arguments of a LightningCLI YAML (``data.init_args`` or a plain ``data`` mapping),
    after the same ``_base_`` composition ``seglstm fit`` applies."""
    from seglstm.config import compose_config

    doc = compose_config(config)
    data = doc.get("data")
    if not isinstance(data, dict):
        raise ValueError(f"{config}: no 'data:' section")
    class_path = data.get("class_path")
    if class_path is not None and class_path.rsplit(".", 1)[-1] != "SegDataModule":
        raise ValueError(f"{config}: data.class_path is {class_path!r}, not seglstm.data.SegDataModule")
    args = data.get("init_args", {} if class_path is not None else data)
    if not isinstance(args, dict):
        raise ValueError(f"{config}: data.init_args must be a mapping")
    return dict(args)


def data_overrides(extra: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``--data.KEY VALUE`` (or ``--data.KEY=VALUE``) pairs, values read as YAML, as ``seglstm fit`` takes
    them; anything else is refused by ``parser``."""
    import yaml

    out: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        key, sep, value = extra[i].partition("=")
        if not key.startswith("--data.") or len(key) == len("--data."):
            parser.error(f"unrecognized argument: {extra[i]} (only --data.KEY VALUE overrides are taken)")
        if not sep:
            if i + 1 >= len(extra):
                parser.error(f"{key} needs a value")
            i, value = i + 1, extra[i + 1]
        out[key[len("--data."):]] = yaml.safe_load(value)
        i += 1
    return out


def main(argv: list[str]) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides = data_overrides(extra, parser)
    from seglstm.data import SegDataModule
    from seglstm.data.check import band_statistics, check_dataset, statistics_yaml
    from seglstm.data.io import check_complete

    try:
        init = {**data_init_args(args.config), **overrides}
        for key in ("root", "predict_root", "scenes"):
            if init.get(key):
                check_complete(Path(init[key]).parent if key == "scenes" else init[key])
        if args.stats and init.get("mean") is None and init.get("bands"):
            # the statistics are what the config lacks: read raw values with a neutral normalisation
            init.update(mean=[0.0] * len(init["bands"]), std=[1.0] * len(init["bands"]))
        module = SegDataModule(**init)
    except (SeglstmError, ValueError, TypeError) as err:
        print(f"seglstm check-data: {args.config}: {err}", file=sys.stderr)
        return 1
    splits = args.split or (["train"] if args.stats else list(dict.fromkeys(["train", "val", module.test_split])))
    if module.dataset == "scenes":
        return _check_scenes(module, init, splits, args)
    problems: list[str] = []
    for split in splits:
        if split == "predict":
            problems += _check_predict(module)
            continue
        try:
            dataset = module.build_split(split)
        except (SeglstmError, ValueError) as err:
            problems.append(f"{split}: {err}")
            continue
        report = check_dataset(dataset, num_workers=args.workers, progress=not args.quiet)
        print(report.table())
        problems += report.problems
        if args.stats and report.band_mean:
            print(f"\n# per-band normalisation of {split} ({report.checked} images)\n" + statistics_yaml(band_statistics(report)))
    return _verdict(problems)


def _verdict(problems: list[str]) -> int:
    """Every problem on stderr and exit 1, or the all-clear and exit 0."""
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("\nno problems found")
    return 0


def _check_scenes(module: Any, init: dict[str, Any], splits: list[str], args: argparse.Namespace) -> int:
    """Per scene: image, labels, overlap, CRS / resolution, geometries, class values, split areas, band
    statistics and a preview; then each split is built as training would build it."""
    from tqdm.auto import tqdm

    from seglstm.data.check import statistics_yaml
    from seglstm.data.io import DataError
    from seglstm.data.scenes import read_scenes_file
    from seglstm.data.scenes.check import check_scene, scenes_band_statistics, scenes_table

    spec = read_scenes_file(init["scenes"])
    bands = [1, 2, 3] if module.bands is None else [b + 1 for b in module.bands]
    folder = args.previews / spec.path.parent.name
    reports = [
        check_scene(i, spec, module.crop_size, bands, folder)
        for i in tqdm(range(len(spec.scenes)), desc="check scenes", disable=args.quiet)
    ]
    print(scenes_table(spec, reports))
    problems = [p for r in reports for p in r.problems]
    for split in splits:
        if split == "predict":
            continue
        try:
            data = module.build_split(split)
            print(f"{split}: {len(data)} window(s) of {module.crop_size[1]}x{module.crop_size[0]}"
                  + (" per epoch" if split == "train" else f" over the {split} area"))
        except (ValueError, DataError) as err:
            problems.append(f"{split}: {err}")
    stats = scenes_band_statistics(reports)
    if args.stats and stats is not None:
        print("\n# per-band normalisation of the scenes (decimated reads)\n" + statistics_yaml(stats))
    return _verdict(problems)


def _check_predict(module: Any) -> list[str]:
    from seglstm.data.io import DataError

    if module.predict_root is None:
        return ["predict: the config has no predict_root"]
    module.setup("predict")
    data = module.datasets["predict"]
    problems = []
    for i in range(len(data)):
        try:
            data[i]
        except DataError as err:
            problems.append(str(err))
    print(f"predict: {len(data) - len(problems)}/{len(data)} images readable in {module.predict_root}")
    return problems
