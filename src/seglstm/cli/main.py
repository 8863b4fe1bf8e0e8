"""``seglstm`` dispatcher.

Each sub-command lives in its own module exposing ``main(argv: list[str]) -> int``; modules are imported
only when their command runs so that ``seglstm synth`` does not pay for importing Lightning. The inference
commands take ``--threads`` and ``--omp-wait-policy`` here, before anything imports torch (see
:mod:`seglstm.utils.threads`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from seglstm.errors import SeglstmError
from seglstm.utils.threads import add_omp_wait_policy, apply_omp_wait_policy, choose_inference_threads

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
    "weights": ("seglstm.cli.weights", "list the pretrained weights by name, and whether each is cached"),
}


INFERENCE_COMMANDS = ("predict", "predict-scene")
THREADS_HELP = """thread options of the inference commands (applied before torch starts):
  --threads N           torch threads (default: OMP_NUM_THREADS if set, else the physical cores this
                        process may use)
  --omp-wait-policy {auto,passive,active,inherit}
                        OMP_WAIT_POLICY (default auto: PASSIVE when the load average exceeds the available
                        CPUs, where spinning OpenMP threads slow inference down several times; otherwise the
                        OpenMP default). An OMP_WAIT_POLICY already in the environment is kept under auto
"""


def _apply_thread_options(cmd: str, rest: list[str]) -> list[str]:
    """Take ``--threads`` / ``--omp-wait-policy`` off an inference command's arguments and apply them."""
    parser = argparse.ArgumentParser(prog=f"seglstm {cmd}", add_help=False, allow_abbrev=False)
    parser.add_argument("--threads", type=int, default=None)
    add_omp_wait_policy(parser, default="auto")
    opts, rest = parser.parse_known_args(rest)
    if opts.threads is not None and opts.threads < 1:
        parser.error(f"--threads must be at least 1, got {opts.threads}")
    apply_omp_wait_policy(opts.omp_wait_policy)
    threads = choose_inference_threads(opts.threads)
    if "torch" in sys.modules:  # called in-process after torch was loaded: the pool size can still change
        sys.modules["torch"].set_num_threads(threads)
    return rest


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
    if cmd in INFERENCE_COMMANDS:
        if {"-h", "--help"} & set(rest):
            print(THREADS_HELP)
        rest = _apply_thread_options(cmd, rest)
    module = importlib.import_module(COMMANDS[cmd][0])
    try:
        if COMMANDS[cmd][0] == "seglstm.cli.lightning":
            return int(module.main([cmd, *rest]) or 0)
        return int(module.main(rest) or 0)
    except SeglstmError as err:  # one the command left to us (e.g. a missing extra): its line, not a traceback
        print(f"seglstm {cmd}: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
