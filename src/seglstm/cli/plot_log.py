"""``seglstm plot-log RUN_DIR``: loss, learning-rate and validation curves of a run, as one PNG.

Reads the CSV logs a run leaves (``RUN_DIR/logs/version_N/metrics.csv``; a resumed run adds a version, and
the versions are joined by iteration, later ones winning where they overlap). RUN_DIR may also be one
``version_N`` folder or a ``metrics.csv`` file.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from seglstm.errors import SeglstmError
from seglstm.training.reports import save_figure

PROG = "seglstm plot-log"
LOSS_PREFIX = "train/loss"
VAL_KEYS = ("val/mIoU", "val/mAcc", "val/aAcc")
LR_KEY = "train/lr"


class LogError(SeglstmError, ValueError):
    """No usable CSV log where the user pointed."""


def find_csv_logs(run_dir: str | Path) -> list[Path]:
    """The ``metrics.csv`` files of a run, oldest version first."""
    run = Path(run_dir)
    if run.is_file():
        return [run]
    if not run.is_dir():
        raise LogError(f"{run} does not exist")
    found = sorted(run.glob("metrics.csv")) or sorted(run.glob("logs/version_*/metrics.csv"))
    if not found:
        found = sorted(run.glob("**/metrics.csv"))
    if not found:
        raise LogError(
            f"{run}: no metrics.csv found (expected logs/version_N/metrics.csv from `seglstm fit`)"
        )

    def version(path: Path) -> tuple[int, str]:
        match = re.search(r"version_(\d+)", str(path))
        return (int(match.group(1)) if match else -1, str(path))

    return sorted(found, key=version)


def read_curves(paths: list[Path]) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` over all files; empty cells (other metrics' rows) are skipped."""
    curves: dict[str, dict[int, float]] = {}
    for path in paths:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            try:
                if reader.fieldnames is None or "step" not in reader.fieldnames:
                    raise LogError(f"{path}: not a Lightning CSV log (no 'step' column)")
                for row in reader:
                    if None in row:
                        raise ValueError(f"{len(reader.fieldnames) + len(row[None])} cells for {len(reader.fieldnames)} columns")
                    step = int(float(row["step"]))
                    for key, cell in row.items():
                        if key in ("step", "epoch") or cell in (None, ""):
                            continue
                        curves.setdefault(key, {})[step] = float(cell)
            except LogError:
                raise
            except UnicodeDecodeError:
                raise LogError(f"{path}: not a text CSV file (not UTF-8)") from None
            except ValueError as err:  # csv.Error is not one: caught below
                raise LogError(f"{path}: line {reader.line_num}: {err}") from err
            except csv.Error as err:
                raise LogError(f"{path}: line {reader.line_num}: {err}") from err
    return curves


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_curves(curves: dict[str, dict[int, float]], path: str | Path, title: str = "") -> Path:
    """Losses (raw and smoothed), lr, and the validation means against the iteration."""
    losses = sorted(k for k in curves if k.startswith(LOSS_PREFIX))
    if not losses and not any(k in curves for k in VAL_KEYS):
        raise LogError(f"no {LOSS_PREFIX}* or val/* columns in the log; found {sorted(curves)}")
    fig = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(fig)
    ax_loss, ax_val, ax_lr = fig.subplots(1, 3)
    for key in losses:
        steps = sorted(curves[key])
        values = [curves[key][s] for s in steps]
        (line,) = ax_loss.plot(steps, values, alpha=0.25, linewidth=0.8)
        ax_loss.plot(steps, _smooth(values, max(1, len(values) // 50)), color=line.get_color(), label=key[6:])
    ax_loss.set_title("training loss")
    ax_loss.set_xlabel("iteration")
    if losses:
        ax_loss.legend(fontsize=8)
    for key in VAL_KEYS:
        if key in curves:
            steps = sorted(curves[key])
            ax_val.plot(steps, [100 * curves[key][s] for s in steps], marker="o", markersize=3, label=key[4:])
    best = curves.get("val/mIoU")
    if best:
        step, value = max(best.items(), key=lambda kv: -math.inf if math.isnan(kv[1]) else kv[1])
        ax_val.set_title(f"validation (best mIoU {100 * value:.2f} at iter {step})")
        ax_val.legend(fontsize=8)
    else:
        ax_val.set_title("validation (none logged)")
    ax_val.set_xlabel("iteration")
    ax_val.set_ylabel("%")
    if LR_KEY in curves:
        steps = sorted(curves[LR_KEY])
        ax_lr.plot(steps, [curves[LR_KEY][s] for s in steps])
    ax_lr.set_title("learning rate")
    ax_lr.set_xlabel("iteration")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dir", help="a run folder (runs/<config>), one logs/version_N folder, or a metrics.csv"
    )
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    out = Path(args.out) if args.out else (run.parent if run.is_file() else run) / "curves.png"
    try:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None or out.is_dir():
            where = f"{blocker} is a file, not a folder" if blocker is not None else f"{out} is a folder"
            raise ValueError(f"--out {out}: cannot write the PNG there ({where})")
        paths = find_csv_logs(args.run_dir)
        plot_curves(read_curves(paths), out, title=str(run))
    except (LogError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{PROG}: error: --out {out}: cannot write ({err.strerror or err})", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote {out} from {len(paths)} log file(s)")
    return 0
