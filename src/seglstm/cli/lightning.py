"""``seglstm fit|validate|test|predict``: LightningCLI over :class:`SegmentationTask` and ``SegDataModule``.

Config files are LightningCLI YAML with mmseg-style ``_base_`` lists (see :mod:`seglstm.training.config`);
dotted overrides (``--trainer.max_steps 100``, ``--model.model_kwargs '{depths: [1,1,1,1]}'``) and
``--print_config`` work as in any LightningCLI. On top of LightningCLI this entry point:

- checks before anything is built that ``data.root`` (``data.predict_root`` for predict) exists, takes
  ``model.num_classes`` from the data and refuses a conflicting value, naming the keys;
- puts each run under ``runs/<config name>`` unless ``trainer.default_root_dir`` says otherwise (checkpoints
  in ``checkpoints/``, CSV + TensorBoard logs in ``logs/version_N``), so ``--ckpt_path last`` resumes;
- lets values stored in a checkpoint given with ``--ckpt_path FILE`` fill the model settings the command
  line and configs leave at their defaults (Lightning's own rule is the reverse: checkpoint over config);
- adds ``test --out DIR`` (per-image colour masks and overlays; metrics always) and
  ``predict --out DIR [--format png|loveda]``;
- treats configs and checkpoints as untrusted: YAML is safe-loaded, every ``class_path`` must lie in the
  project's or Lightning's modules unless ``--allow-class-path MODULE`` names it, and checkpoints load with
  ``weights_only=True`` unless ``--unsafe-load`` (which warns);
- with ``--auto-resume`` (or ``SEGLSTM_AUTO_RESUME=1``, or a torchrun elastic restart) ``fit`` resumes from
  the run's ``checkpoints/last.ckpt`` when there is one.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from seglstm.data.io import DataError
from seglstm.training.callbacks import SegPredictionWriter, TestReportWriter
from seglstm.training.config import ConfigError, check_class_paths, compose_config, has_bases
from seglstm.training.faults import NonFiniteLossError, RunDirectoryError
from seglstm.training.optim import check_schedule
from seglstm.training.task import SegmentationTask
from seglstm.training.trainer import SegTrainer
from seglstm.utils.io import CheckpointLoadError, atomic_write_text, torch_load

SUBCOMMANDS = ("fit", "validate", "test", "predict")
RUNS_DIR = "runs"


class ConfigValueError(ValueError):
    """A config value is wrong in a way jsonargparse's type checks cannot see (missing path, class count)."""


def _datamodule_class() -> type:
    from seglstm.training.data_order import ResumableSegDataModule

    return ResumableSegDataModule


def _check_inline_class_paths(argv: list[str], allowed: tuple[str, ...]) -> None:
    """``--X.class_path V``, ``--trainer.callbacks+=V`` and YAML/JSON values that hold a ``class_path``."""
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or arg.startswith(("--config", "-c")):
            continue
        name, value = arg.split("=", 1) if "=" in arg else (arg, argv[i + 1] if i + 1 < len(argv) else "")
        key = name.lstrip("-")
        source = f"argument {name}"
        if key.endswith((".class_path", "+")):
            parent = key[: -len(".class_path")] if key.endswith(".class_path") else key.rstrip("+")
            check_class_paths({"class_path": value}, source, allowed, parent)
        elif "class_path" in value:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise ConfigError(f"{source}: value is not valid YAML: {err}") from err
            check_class_paths(parsed, source, allowed, key)


def expand_configs(argv: list[str], allowed_class_paths: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Replace every ``--config FILE`` that uses ``_base_`` by the composed YAML text, after checking every
    config (file or inline) and argument for ``class_path`` values outside the allowed modules.

    Returns the new argv and the config file names in order (the last one names the run folder).
    """
    _check_inline_class_paths(argv, allowed_class_paths)
    out: list[str] = []
    names: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg in ("--config", "-c") and i + 1 < len(argv):
            value, step = argv[i + 1], 2
        elif arg.startswith("--config="):
            value, step = arg.split("=", 1)[1], 1
        if value is None:
            out.append(arg)
            i += 1
            continue
        path = Path(value)
        if path.suffix.lower() in (".yaml", ".yml", ".json") and path.is_file():
            names.append(path.stem)
            composed = compose_config(path)
            check_class_paths(composed, str(path), allowed_class_paths)
            if has_bases(path):
                value = yaml.safe_dump(composed, sort_keys=False)
        elif path.suffix.lower() in (".yaml", ".yml", ".json"):
            raise ConfigError(f"--config {value}: file does not exist")
        else:
            try:
                inline = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise ConfigError(f"--config: the value is neither a .yaml file nor valid YAML: {err}") from err
            check_class_paths(inline, "--config", allowed_class_paths)
        out += ["--config", value]
        i += step
    return out, names


class RunConfigCallback(SaveConfigCallback):
    """Also keep the config of the latest ``fit`` as ``<run folder>/config.yaml`` (what README examples use);
    every run's own copy stays in its ``logs/version_N`` folder."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        text = self.parser.dump(self.config, skip_none=False)
        atomic_write_text(Path(trainer.default_root_dir) / self.config_filename, text)


class SegLightningCLI(LightningCLI):
    """LightningCLI with the project's checks, run layout and test/predict outputs (module docstring)."""

    def __init__(
        self,
        *args: Any,
        run_name: str | None = None,
        unsafe_load: bool = False,
        auto_resume: bool = False,
        **kwargs: Any,
    ) -> None:
        self.run_name = run_name
        self.unsafe_load = unsafe_load
        self.auto_resume = auto_resume
        super().__init__(*args, **kwargs)

    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "test":
            parser.add_argument(
                "--out",
                type=str | None,
                default=None,
                help="also write per-image colour masks and overlays (and the metrics) to this folder",
            )
        if subcommand == "predict":
            parser.add_argument("--out", type=str, required=True, help="folder for the predicted masks")
            parser.add_argument(
                "--format",
                type=str,
                default="png",
                choices=["png", "loveda"],
                help="png: masks/ (class indices) + color/; loveda: the LoveDA submission (values 0-6)",
            )
            parser.set_defaults(return_predictions=False)
        return parser

    # -- checkpoint hyper-parameters fill what the user left unset -----------------------------------------

    def _run_root(self) -> Path:
        sub = self.config.get("subcommand")
        trainer_cfg = (self.config[sub] if sub else self.config).trainer
        if trainer_cfg.get("default_root_dir") is None:
            trainer_cfg.default_root_dir = str(Path(RUNS_DIR) / (self.run_name or "default"))
        return Path(trainer_cfg.default_root_dir)

    def _resolve_ckpt_alias(self, sub: str, ckpt_path: str) -> str:
        """``last``/``best`` outside ``fit`` name files of this run's ``checkpoints`` folder."""
        folder = self._run_root() / "checkpoints"
        if ckpt_path == "last":
            found = [folder / "last.ckpt"] if (folder / "last.ckpt").is_file() else []
        else:
            found = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigValueError(f"--ckpt_path {ckpt_path}: no such checkpoint in {folder}")
        self.config[sub].ckpt_path = str(found[-1])
        return str(found[-1])

    def _parse_ckpt_path(self) -> None:
        """Resolve ``last``/``best``; then let the checkpoint's hyper-parameters fill unset model settings."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if ckpt_path in ("last", "best") and sub != "fit":
            ckpt_path = self._resolve_ckpt_alias(sub, ckpt_path)
        if sub == "fit" and ckpt_path is None and self.auto_resume:
            last = self._run_root() / "checkpoints" / "last.ckpt"
            if last.is_file():
                print(f"seglstm fit: resuming from {last} (auto-resume)", file=sys.stderr)
                ckpt_path = self.config[sub].ckpt_path = str(last)
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        ckpt = torch_load(ckpt_path, unsafe=self.unsafe_load)
        if not isinstance(ckpt, dict):
            raise ConfigValueError(f"--ckpt_path {ckpt_path}: not a checkpoint dictionary")
        hparams = dict(ckpt.get("hyper_parameters", {}))
        for key in ("_instantiator", "_class_path"):
            hparams.pop(key, None)
        defaults = self._subcommand_parsers[sub].get_defaults().model
        model_cfg = self.config[sub].model
        for key, value in hparams.items():
            if key in model_cfg and model_cfg[key] == defaults.get(key):
                model_cfg[key] = value

    # -- checks and derived values before anything is instantiated -----------------------------------------

    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self.config[sub] if sub else self.config
        if cfg.trainer.get("unsafe_load") and not self.unsafe_load:
            raise ConfigValueError(
                "trainer.unsafe_load is set by a config or argument: full unpickling needs the --unsafe-load flag"
            )
        cfg.trainer.unsafe_load = self.unsafe_load
        self._check_data_paths(cfg.data, sub)
        self._link_num_classes(cfg)
        root = self._run_root()
        if sub == "fit":
            self._check_schedule(cfg)
            print(
                f"seglstm fit: run folder {root} (checkpoints/, logs/version_N/, config.yaml)",
                file=sys.stderr,
            )

    def instantiate_classes(self) -> None:
        """Build data, model and trainer; a bad value surfaces here, before any step, naming its key."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:
            raise ConfigValueError(str(err)) from err

    @staticmethod
    def _check_schedule(cfg: Namespace) -> None:
        """Schedule lengths are checked here so a bad one fails before DDP starts (and a torchrun restart)."""
        model = cfg.model
        own = model.get("max_iters") is not None
        try:
            check_schedule(
                model.max_iters if own else cfg.trainer.get("max_steps"),
                model.warmup_iters,
                "model.max_iters" if own else "trainer.max_steps",
                "model.warmup_iters",
            )
        except ValueError as err:
            raise ConfigValueError(str(err)) from err

    @staticmethod
    def _check_data_paths(data: Namespace, subcommand: str | None) -> None:
        keys = ["root"]
        if subcommand == "predict":
            keys = ["predict_root"]
        for key in keys:
            value = data.get(key)
            if value is None:
                raise ConfigValueError(f"data.{key} is not set: give the dataset folder")
            if not Path(value).is_dir():
                raise ConfigValueError(f"data.{key}: {value} is not a directory")
        classes_file = data.get("classes_file")
        if classes_file is not None and not Path(classes_file).is_file():
            raise ConfigValueError(f"data.classes_file: {classes_file} does not exist")

    def _link_num_classes(self, cfg: Namespace) -> None:
        try:
            datamodule = _datamodule_class()(**cfg.data.as_dict())
        except (ValueError, TypeError, FileNotFoundError) as err:  # DataError is a ValueError
            raise ConfigValueError(f"data: {err}") from err
        n = int(datamodule.num_classes)
        given = cfg.model.get("num_classes")
        if given is None:
            cfg.model.num_classes = n
        elif int(given) != n:
            raise ConfigValueError(
                f"model.num_classes={given} conflicts with data.dataset={cfg.data.get('dataset')!r}, which has "
                f"{n} classes ({', '.join(datamodule.classes)}); drop model.num_classes or fix it"
            )

    # -- outputs of test / predict -------------------------------------------------------------------------

    def instantiate_trainer(self, **kwargs: Any) -> SegTrainer:
        sub = self.subcommand
        extra: list[Any] = []
        if sub == "test":
            out = self.config[sub].get("out")
            extra.append(TestReportWriter(out_dir=out, save_images=out is not None))
        elif sub == "predict":
            extra.append(SegPredictionWriter(self.config[sub].out, self.config[sub].format))
        trainer = super().instantiate_trainer(**kwargs)
        for callback in extra:
            trainer.callbacks.append(callback)
        return trainer


def pop_safety_flags(argv: list[str]) -> tuple[list[str], bool, tuple[str, ...], bool]:
    """Take ``--unsafe-load``, ``--allow-class-path MODULE`` (repeatable) and ``--auto-resume`` out of ``argv``.

    Returns:
        ``(rest, unsafe_load, allowed_modules, auto_resume)``.
    """
    rest: list[str] = []
    unsafe = auto_resume = False
    allowed: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--unsafe-load":
            unsafe = True
        elif arg == "--auto-resume":
            auto_resume = True
        elif arg == "--allow-class-path":
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise ConfigError("--allow-class-path needs a module name, e.g. --allow-class-path mypkg")
            allowed.append(argv[i + 1])
            i += 1
        elif arg.startswith("--allow-class-path="):
            allowed.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return rest, unsafe, tuple(a for a in allowed if a), auto_resume


def _env_auto_resume() -> bool:
    """``SEGLSTM_AUTO_RESUME=1``, or a restart by torchrun's elastic agent (its restart count is > 0)."""
    if os.environ.get("SEGLSTM_AUTO_RESUME", "").lower() in ("1", "true", "yes"):
        return True
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def main(argv: list[str] | None = None) -> int:
    """``argv[0]`` is the sub-command (fit, validate, test, predict); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"seglstm: expected one of {', '.join(SUBCOMMANDS)} as the first argument", file=sys.stderr)
        return 2
    try:
        argv, unsafe_load, allowed, auto_resume = pop_safety_flags(argv)
        expanded, names = expand_configs(argv, allowed)
        # argv is handed over explicitly (composed configs replace file names), which LightningCLI would
        # otherwise report as "args given while sys.argv also has arguments" on every run.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        SegLightningCLI(
            SegmentationTask,
            _datamodule_class(),
            trainer_class=SegTrainer,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            save_config_callback=RunConfigCallback,
            save_config_kwargs={"overwrite": True},
            args=expanded,
            run_name=names[-1] if names else None,
            unsafe_load=unsafe_load,
            auto_resume=auto_resume or _env_auto_resume(),
        )
    except (ConfigError, ConfigValueError) as err:
        print(f"seglstm {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except (CheckpointLoadError, RunDirectoryError, NonFiniteLossError, DataError, OSError) as err:
        print(f"seglstm {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    return 0
