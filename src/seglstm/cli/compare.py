"""``seglstm compare``: train (or evaluate) several models under one data config, recipe, budget and seed,
then write one comparison table (Markdown, JSON, CSV) and two plots. See :mod:`seglstm.study.compare`."""

from __future__ import annotations

import argparse
import sys

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
    from seglstm.study.compare import (
        CompareConfig,
        parse_budget,
        parse_ckpts,
        parse_key_values,
        parse_model_overrides,
        parse_sizes,
        run_compare,
    )

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
