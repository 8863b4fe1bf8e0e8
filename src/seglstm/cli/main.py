"""``seglstm`` dispatcher.

Each sub-command lives in its own module exposing ``main(argv: list[str]) -> int``; modules are imported
only when their command runs so that ``seglstm synth`` does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("seglstm.cli.lightning", "train a model from a YAML config (LightningCLI)"),
    "validate": ("seglstm.cli.lightning", "evaluate a checkpoint on the val split"),
    "test": ("seglstm.cli.lightning", "evaluate on the test split, write metrics, confusion matrix, overlays"),
    "predict": ("seglstm.cli.lightning", "segment a folder of images"),
    "predict-scene": ("seglstm.cli.predict_scene", "segment a whole GeoTIFF scene into a georeferenced mask"),
    "export": ("seglstm.cli.export", "export a checkpoint to ONNX (or torch.export .pt2) at a fixed tile"),
    "synth": ("seglstm.cli.synth", "generate the built-in synthetic LoveDA-like dataset"),
    "convert": ("seglstm.cli.convert", "convert official ISPRS Potsdam/Vaihingen tiles to mmseg's layout"),
    "check-data": ("seglstm.cli.check_data", "validate a dataset and print a per-class pixel histogram"),
    "plot-log": ("seglstm.cli.plot_log", "draw loss / mIoU curves of a run to PNG"),
    "compare": ("seglstm.cli.compare", "train and measure several models under one budget"),
    "demo": ("seglstm.cli.demo", "the main job on the built-in synthetic data"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: seglstm <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run 'seglstm <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"seglstm: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    if COMMANDS[cmd][0] == "seglstm.cli.lightning":
        return int(module.main([cmd, *rest]) or 0)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
