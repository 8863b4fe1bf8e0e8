"""``seglstm compare``: train (or evaluate) several models under one data config, recipe, budget and seed,
then write one comparison table (Markdown, JSON, CSV) and two plots. See :mod:`seglstm.study.compare`.

This module turns the command line into a :class:`~seglstm.study.compare.CompareConfig`; every parser raises
``ValueError`` naming the option, which ``main`` prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from seglstm.study.compare import Budget

EPILOG = """\
examples:
  seglstm compare --models seglstm_upernet_s,vit_s_upernet,swin_t_upernet,mamba_upernet,deeplabv3plus_r50 \\
      --data configs/demo.yaml --budget 10m
  seglstm compare --models seglstm_upernet_s,deeplabv3plus_r50 --data configs/seglstm_upernet_15k_loveda_512x512.yaml \\
      --budget 15000 --data-overrides root=data/loveDA
  seglstm compare --models seglstm_upernet_s --data CONFIG --budget 2 --ckpts seglstm_upernet_s=seg_lstm_loveda.pth

outputs in --out: compare.md / compare.json / compare.csv, miou_vs_time.png, time_vs_size.png, and one
folder per model (checkpoints/, logs/, result.json, error_*.txt).
"""


def parse_budget(text: str) -> Budget:
    """``"200"`` -> 200 steps; ``"10m"`` (or ``10min``, ``1.5m``) -> minutes of training per model."""
    from seglstm.study.compare import Budget

    s = str(text).strip().lower()
    minutes = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:m|min|mins|minutes?)", s)
    if minutes:
        value = float(minutes.group(1))
        if value <= 0:
            raise ValueError(f"--budget {text!r}: minutes must be positive")
        return Budget(minutes=value)
    if re.fullmatch(r"\d+", s):
        steps = int(s)
        if steps < 2:
            raise ValueError(f"--budget {text!r}: at least 2 training steps are needed (one to warm up, one timed)")
        return Budget(steps=steps)
    raise ValueError(
        f"--budget {text!r}: expected a number of training steps (e.g. 200) or minutes per model (e.g. 10m)"
    )


def parse_sizes(text: str, option: str = "--sizes") -> list[int]:
    """``"512,1024"`` -> ``[512, 1024]`` (positive, unique, in the given order)."""
    try:
        sizes = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"{option} {text!r}: expected comma-separated pixel sizes such as 512,1024") from err
    if not sizes or any(s < 16 for s in sizes):
        raise ValueError(f"{option} {text!r}: sizes must be integers >= 16")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"{option} {text!r}: a size is repeated")
    return sizes


def _yaml_value(text: str) -> Any:
    text = text.strip()
    if text.startswith("(") and text.endswith(")"):  # let users write tuples as Python does
        text = "[" + text[1:-1] + "]"
    value = yaml.safe_load(text) if text else ""
    if isinstance(value, str):  # PyYAML reads 1e-3 as a string (YAML 1.1); users mean a number
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_key_values(items: Sequence[str], option: str) -> dict[str, Any]:
    """``["batch_size=2", "crop_size=[128,128]"]`` -> a dict with YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = _yaml_value(value)
        except yaml.YAMLError as err:
            raise ValueError(f"{option} {item!r}: the value is not valid YAML ({err})") from err
    return out


def parse_model_overrides(items: Sequence[str], models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["seglstm_upernet_s:embed_dim=192", ...]`` -> ``{"seglstm_upernet_s": {"embed_dim": 192}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or "=" not in rest:
            raise ValueError(f"--model-overrides {item!r}: expected MODEL:KEY=VALUE")
        name = name.strip()
        if name not in models:
            raise ValueError(f"--model-overrides {item!r}: {name!r} is not one of --models ({', '.join(models)})")
        out.setdefault(name, {}).update(parse_key_values([rest], "--model-overrides"))
    return out


def parse_ckpts(text: str | None, models: Sequence[str]) -> dict[str, Path]:
    """``"name=path,name=path"`` -> checkpoints to evaluate instead of training those models."""
    out: dict[str, Path] = {}
    for item in [v for v in (text or "").split(",") if v.strip()]:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--ckpts {item!r}: expected MODEL=PATH")
        if name not in models:
            raise ValueError(f"--ckpts {item!r}: {name!r} is not one of --models ({', '.join(models)})")
        if not Path(path).is_file():
            raise ValueError(f"--ckpts {item!r}: {path} does not exist or is not a file")
        out[name] = Path(path)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seglstm compare",
        description="Train each model with the same data config, recipe, budget and seed (or evaluate given "
        "checkpoints), measure parameters, FLOPs, speed and peak memory, and write one comparison table.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", required=True, help="comma-separated presets, e.g. seglstm_upernet_s,vit_s_upernet")
    p.add_argument(
        "--data",
        default="configs/demo.yaml",
        help="config whose data section (and recipe keys of model/trainer) every model uses "
        "(default configs/demo.yaml, the synthetic CPU config)",
    )
    p.add_argument("--budget", required=True, help="training steps per model (200) or minutes per model (10m)")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--ckpts", help="MODEL=PATH,... : evaluate these checkpoints instead of training the models")
    p.add_argument(
        "--model-overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="MODEL:KEY=VALUE",
        help="preset overrides, values in YAML, e.g. seglstm_upernet_s:embed_dim=192 'seglstm_upernet_s:depths=[2,2,2,2]'",
    )
    p.add_argument(
        "--data-overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="data-section overrides, values in YAML, e.g. batch_size=2 'crop_size=[256,256]' root=data/loveDA",
    )
    p.add_argument("--sizes", default="512,1024", help="inference sizes to time (default 512,1024)")
    p.add_argument("--flops-size", type=int, default=512, help="input side for the FLOP count (default 512)")
    p.add_argument("--accelerator", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--devices", default="auto", help="one device: auto, 1, or a GPU index as N, or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, shuffling and augmentation (default 0)")
    p.add_argument("--repeats", type=int, default=3, help="timed inference calls per size (default 3)")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the results of models whose folder holds a successful run with identical settings",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar over the models")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from seglstm.study.compare import CompareConfig, run_compare

    try:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        cfg = CompareConfig(
            models=models,
            data_config=args.data,
            budget=parse_budget(args.budget),
            out=args.out,
            ckpts={k: str(v) for k, v in parse_ckpts(args.ckpts, models).items()},
            overrides=parse_model_overrides(args.model_overrides, models),
            data_overrides=parse_key_values(args.data_overrides, "--data-overrides"),
            sizes=parse_sizes(args.sizes),
            flops_size=parse_sizes(str(args.flops_size), "--flops-size")[0],
            seed=args.seed,
            accelerator=args.accelerator,
            devices=args.devices,
            repeats=args.repeats,
            reuse=args.reuse,
        )
        payload = run_compare(cfg, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as err:
        print(f"seglstm compare: error: {err}", file=sys.stderr)
        return 2
    failed = [row["model"] for row in payload["rows"] if row["status"] != "ok"]
    print(f"seglstm compare: wrote {payload['paths']['markdown']} (+ .json, .csv, 2 plots)")
    if failed:
        print(f"seglstm compare: {len(failed)} model(s) failed: {', '.join(failed)} (see the table)", file=sys.stderr)
        return 1
    return 0
