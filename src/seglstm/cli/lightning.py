"""``seglstm fit|validate|test|predict``: LightningCLI over :class:`SegmentationTask` and ``SegDataModule``.

Config files are LightningCLI YAML with mmseg-style ``_base_`` lists (see :mod:`seglstm.config`);
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
  the run's newest checkpoint by global step (``checkpoints/index.json``, else each file's own step) and
  says which, or says that there is none and starts at step 0;
- keeps one run per run folder: ``fit`` into a folder that already holds a run refuses unless it resumes
  (``--auto-resume``, ``--ckpt_path``) or ``--new-version`` sends it to a new ``<folder>-vN``;
- resolves ``--ckpt_path best`` to the best score recorded in ``checkpoints/index.json``, not the newest file;
- accepts a plain weights file as ``--ckpt_path`` for validate/test/predict (as ``predict-scene`` does), and
  refuses a checkpoint that does not fit the configured model in one line naming the first keys;
- scans the val split cheaply before ``fit``/``validate`` (headers, truncated files, label values) and
  checks ``test/predict --out`` is writable before the first batch.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from seglstm.config import ConfigError, check_class_paths, compose_config, has_bases
from seglstm.data.io import DataError, check_complete
from seglstm.data.registry import dataset_meta
from seglstm.errors import SeglstmError
from seglstm.models.checkpoint import CheckpointMismatchError, load_pretrained
from seglstm.training.callbacks import (
    LAST_NAME,
    SegPredictionWriter,
    TestReportWriter,
    TrainingInterrupted,
    read_index,
)
from seglstm.training.faults import RunDirectoryError, probe_dir
from seglstm.training.optim import check_schedule
from seglstm.training.task import SegmentationTask
from seglstm.training.trainer import SegTrainer
from seglstm.utils.io import CheckpointLoadError, atomic_write_text, torch_load, verify_checkpoint_crcs

SUBCOMMANDS = ("fit", "validate", "test", "predict")
RUNS_DIR = "runs"


class ConfigValueError(SeglstmError, ValueError):
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
            if not composed:
                raise ConfigError(f"--config {value}: the file is empty (no settings): fill it in or leave it out")
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

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Without a logger Lightning's log_dir is the run folder itself: a validate/test/predict there would
        # overwrite the run's config.yaml with its own (which the next `--config RUN/config.yaml` then reads).
        log_dir = Path(trainer.log_dir or trainer.default_root_dir).resolve()
        self.save_to_log_dir = log_dir != Path(trainer.default_root_dir).resolve()
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Paths become absolute so `validate --config RUN/config.yaml` works from any folder.
        config = self.config.clone()
        for group, key in (("data", "root"), ("data", "predict_root"), ("data", "classes_file"),
                           ("trainer", "default_root_dir")):  # fmt: skip
            value = config[group].get(key) if config.get(group) is not None else None
            if isinstance(value, str):
                config[group][key] = str(Path(value).resolve())
        text = self.parser.dump(config, skip_none=False)
        atomic_write_text(Path(trainer.default_root_dir) / self.config_filename, text)


def holds_run(root: Path) -> bool:
    """Whether a run folder already holds a run: checkpoints, or the config a ``fit`` saved."""
    return (root / "config.yaml").is_file() or any((root / "checkpoints").glob("*.ckpt"))


def newest_checkpoint(folder: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint of ``folder`` with the highest global step, skipping damaged ones.

    Steps come from ``index.json`` (written with every checkpoint), else from the file itself. On a tie the
    folder's ``last.ckpt`` wins (it carries the same state as the periodic file of that step).

    Returns:
        ``(path or None, notes on files skipped)``.
    """
    index = read_index(folder)["checkpoints"]
    notes: list[str] = []
    steps: dict[Path, int] = {}
    for path in sorted(folder.glob("*.ckpt")):
        entry = index.get(path.name)
        if entry is not None:
            steps[path] = int(entry.get("global_step", -1))
            continue
        try:
            steps[path] = int(torch_load(path).get("global_step", -1))
        except (CheckpointLoadError, AttributeError) as err:
            notes.append(f"skipped {path}: {err}")
    for path in sorted(steps, key=lambda p: (steps[p], p.name == LAST_NAME), reverse=True):
        try:
            verify_checkpoint_crcs(path)
        except CheckpointLoadError as err:
            notes.append(f"skipped {err}")
            continue
        return path, notes
    return None, notes


def best_checkpoint(folder: Path) -> Path:
    """The file with the best score recorded in ``index.json`` (the monitor of ``val/mIoU`` when several are)."""
    recorded = {
        monitor: entry for monitor, entry in read_index(folder)["best"].items() if (folder / entry["file"]).is_file()
    }
    if len(recorded) > 1:
        recorded = {k: v for k, v in recorded.items() if k == "val/mIoU"} or recorded
    if len(recorded) == 1:
        return folder / next(iter(recorded.values()))["file"]
    if len(recorded) > 1:
        raise ConfigValueError(
            f"--ckpt_path best: {folder} records best checkpoints for {', '.join(sorted(recorded))}; name the file"
        )
    candidates = sorted(folder.glob("best*.ckpt"))
    if len(candidates) == 1:  # a folder from before index.json: one best file is unambiguous
        return candidates[0]
    if not candidates:
        raise ConfigValueError(f"--ckpt_path best: no such checkpoint in {folder}")
    raise ConfigValueError(
        f"--ckpt_path best: {folder} has {len(candidates)} best*.ckpt files and no index.json recording their "
        "scores; name the file"
    )


def _state_shapes(ckpt: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in (ckpt.get("state_dict") or {}).items() if hasattr(v, "shape")}


class ConfigParseError(SeglstmError, ValueError):
    """jsonargparse rejected a key or value; raised instead of its usage dump (``--help`` still shows it)."""


class SegArgumentParser(LightningArgumentParser):
    """Lightning's parser whose errors end the command with one line (see :func:`describe_parse_error`)
    rather than the ~80 lines of usage jsonargparse prints before them.

    Args:
        for_subcommand: the sub-command this parser reads (given through LightningCLI's per-sub-command
            ``parser_kwargs``), so the CLI can add that sub-command's own options to it.
    """

    def __init__(self, *args: Any, for_subcommand: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.for_subcommand = for_subcommand

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error:  # a nested parse that jsonargparse catches itself
            return super().error(message, ex)
        raise ConfigParseError(message) from ex


def _lookup(doc: Any, key: str) -> bool:
    """Whether the dotted ``key`` is set in the config mapping ``doc`` (through ``init_args`` levels too)."""
    for part in key.split("."):
        if isinstance(doc, dict) and part not in doc and isinstance(doc.get("init_args"), dict):
            doc = doc["init_args"]
        if not isinstance(doc, dict) or part not in doc:
            return False
        doc = doc[part]
    return True


def _sets(path: Path, key: str) -> bool:
    try:
        return _lookup(compose_config(path), key)
    except ConfigError:
        return False


def describe_parse_error(message: str, subcommand: str, argv: list[str], config_files: list[Path]) -> str:
    """One line for a jsonargparse error: the config file (or argument) that sets the key, the key, and what
    is wrong with it."""
    found = re.search(r"option '([\w.]+)'|[Kk]ey \"([\w.]+)\"|[Kk]ey '([\w.]+)'", message)
    key = next((g for g in found.groups() if g), None) if found else None
    detail = " ".join(message.split())
    if found and "does not accept option" in message:
        detail = f"unknown key (not an option of seglstm {subcommand})"
    elif key and found:
        detail = " ".join(message[found.end():].split()).lstrip(":. ") or detail
    where = "the command line"
    if key:
        if any(a == f"--{key}" or a.startswith(f"--{key}=") for a in argv):  # arguments override the files
            where = f"argument --{key}"
        else:
            where = next((f"config file {p}" for p in reversed(config_files) if _sets(p, key)), where)
        detail = f"{key}: {detail}"
    return f"{where}: {detail} (`seglstm {subcommand} --help` lists the options)"


class SegLightningCLI(LightningCLI):
    """LightningCLI with the project's checks, run layout and test/predict outputs (module docstring).

    Only public hooks: each sub-command's parser is a :class:`SegArgumentParser` told its sub-command
    (``parser_kwargs``), so :meth:`add_arguments_to_parser` can record it and :meth:`setup_parser` add
    ``test/predict --out``; the checkpoint is resolved in :meth:`parse_arguments` and kept out of the config
    until :meth:`before_instantiate_classes`, so Lightning's own checkpoint parsing (hyper-parameters over
    the config, full checkpoints only) never sees it.
    """

    def __init__(
        self,
        *args: Any,
        run_name: str | None = None,
        unsafe_load: bool = False,
        auto_resume: bool = False,
        new_version: bool = False,
        **kwargs: Any,
    ) -> None:
        self.run_name = run_name
        self.unsafe_load = unsafe_load
        self.auto_resume = auto_resume
        self.new_version = new_version
        self.resuming = False
        self.weights_file: str | None = None
        self.ckpt_shapes: dict[str, tuple[int, ...]] | None = None
        self.subcommand_parsers: dict[str, LightningArgumentParser] = {}
        self._held_ckpt_path: str | None = None
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        for sub in self.subcommands():
            parser_kwargs[sub] = {**parser_kwargs.get(sub, {}), "for_subcommand": sub}
        super().__init__(*args, parser_class=SegArgumentParser, parser_kwargs=parser_kwargs, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        subcommand = getattr(parser, "for_subcommand", None)
        if subcommand is not None:
            self.subcommand_parsers[subcommand] = parser

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # After Lightning added the Trainer method's arguments (ckpt_path, verbose, ...), whose defaults change.
        for subcommand, parser in self.subcommand_parsers.items():
            self.add_subcommand_arguments(parser, subcommand)

    def subcommand_defaults(self, subcommand: str) -> Namespace:
        """The defaults of ``subcommand``'s parser."""
        return self.subcommand_parsers[subcommand].get_defaults()

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then resolve the checkpoint (:meth:`resolve_checkpoint`) and hold it back until
        :meth:`before_instantiate_classes` (see the class docstring)."""
        super().parse_arguments(parser, args)
        self.resolve_checkpoint()
        sub = self.config.get("subcommand")
        if sub:
            self._held_ckpt_path = self.config[sub].get("ckpt_path")
            self.config[sub].ckpt_path = None

    def add_subcommand_arguments(self, parser: LightningArgumentParser, subcommand: str) -> None:
        """Options of one sub-command only: ``test --out``, ``predict --out/--format``."""
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
                type=Literal["png", "loveda"],
                default="png",
                help="png: masks/ (class indices) + color/; loveda: the LoveDA submission (values 0-6)",
            )
            parser.set_defaults(return_predictions=False)
        if subcommand in ("validate", "test"):
            # The metric table in percent (mmseg's way) is printed instead of Lightning's table of fractions.
            parser.set_defaults(verbose=False)

    # -- checkpoint hyper-parameters fill what the user left unset -----------------------------------------

    def _run_root(self) -> Path:
        sub = self.config.get("subcommand")
        trainer_cfg = (self.config[sub] if sub else self.config).trainer
        if trainer_cfg.get("default_root_dir") is None:
            trainer_cfg.default_root_dir = str(Path(RUNS_DIR) / (self.run_name or "default"))
        return Path(trainer_cfg.default_root_dir)

    def _resolve_ckpt_alias(self, sub: str, ckpt_path: str) -> str:
        """``last``/``best`` name files of this run's ``checkpoints`` folder."""
        folder = self._run_root() / "checkpoints"
        if ckpt_path == "last":
            if not (folder / LAST_NAME).is_file():
                raise ConfigValueError(f"--ckpt_path last: no such checkpoint in {folder}")
            found = folder / LAST_NAME
        else:
            found = best_checkpoint(folder)
        print(f"seglstm {sub}: --ckpt_path {ckpt_path} is {found}", file=sys.stderr)
        self.config[sub].ckpt_path = str(found)
        return str(found)

    def _auto_resume_path(self) -> str | None:
        folder = self._run_root() / "checkpoints"
        found, notes = newest_checkpoint(folder)
        for note in notes:
            print(f"seglstm fit: auto-resume {note}", file=sys.stderr)
        if found is None:
            print(f"seglstm fit: auto-resume: no checkpoint of this run in {folder}; starting at step 0", file=sys.stderr)
            return None
        print(f"seglstm fit: auto-resume from {found}", file=sys.stderr)
        return str(found)

    def resolve_checkpoint(self) -> None:
        """Resolve ``last``/``best`` and ``--auto-resume``; let the checkpoint's hyper-parameters fill unset
        model settings; remember a plain weights file (loaded by ``load_pretrained``) and the state's shapes."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if ckpt_path in ("last", "best"):  # for fit too: a missing last.ckpt is an error, not a fresh start
            ckpt_path = self._resolve_ckpt_alias(sub, ckpt_path)
        if sub == "fit" and ckpt_path is None and self.auto_resume:
            ckpt_path = self.config[sub].ckpt_path = self._auto_resume_path()
        self.resuming = sub == "fit" and (ckpt_path is not None or self.auto_resume)
        if not ckpt_path or "://" in str(ckpt_path):  # remote paths are Lightning's (fsspec)
            return
        if not Path(ckpt_path).is_file():
            raise ConfigValueError(f"--ckpt_path {ckpt_path}: no such file")
        ckpt = torch_load(ckpt_path, unsafe=self.unsafe_load)
        if not isinstance(ckpt, dict):
            raise ConfigValueError(f"--ckpt_path {ckpt_path}: not a checkpoint dictionary")
        if "pytorch-lightning_version" not in ckpt:
            if sub == "fit":
                raise ConfigValueError(
                    f"--ckpt_path {ckpt_path} holds weights only, not a training checkpoint (no optimizer or "
                    "loop state), so fit cannot resume from it"
                )
            self.weights_file = str(ckpt_path)
            self.config[sub].ckpt_path = None
            return
        self.ckpt_shapes = _state_shapes(ckpt)
        hparams = dict(ckpt.get("hyper_parameters", {}))
        for key in ("_instantiator", "_class_path"):
            hparams.pop(key, None)
        defaults = self.subcommand_defaults(sub).model
        model_cfg = self.config[sub].model
        for key, value in hparams.items():
            if key in model_cfg and model_cfg[key] == defaults.get(key):
                model_cfg[key] = value

    # -- checks and derived values before anything is instantiated -----------------------------------------

    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self.config[sub] if sub else self.config
        if sub:
            cfg.ckpt_path = self._held_ckpt_path
        if cfg.trainer.get("unsafe_load") and not self.unsafe_load:
            raise ConfigValueError(
                "trainer.unsafe_load is set by a config or argument: full unpickling needs the --unsafe-load flag"
            )
        cfg.trainer.unsafe_load = self.unsafe_load
        self._check_data_paths(cfg.data, sub)
        self._link_num_classes(cfg)
        if sub == "fit" and self.new_version:
            cfg.trainer.default_root_dir = str(self._free_version(self._run_root()))
        root = self._run_root()
        if sub == "fit":
            self._check_schedule(cfg)
            print(
                f"seglstm fit: run folder {root} (checkpoints/, logs/version_N/, config.yaml)",
                file=sys.stderr,
            )

    @staticmethod
    def _free_version(root: Path) -> Path:
        """``root`` itself while it holds no run, else the first ``<root>-vN`` that does not."""
        candidate, n = root, 1
        while holds_run(candidate):
            candidate, n = root.with_name(f"{root.name}-v{n}"), n + 1
        return candidate

    # -- checks right before the command runs (everything is built) -----------------------------------------

    def _check_ckpt_fits(self, sub: str) -> None:
        """A checkpoint of another width or class count fails here in one line, not deep in Lightning."""
        target = self.model.model
        if self.weights_file is not None:
            try:
                report = load_pretrained(target, self.weights_file, strict=True, unsafe=self.unsafe_load)
            except CheckpointMismatchError as err:
                raise ConfigValueError(f"--ckpt_path {err}") from err
            print(f"seglstm {sub}: {report} from {self.weights_file} (weights only)", file=sys.stderr)
            return
        if self.ckpt_shapes is None:
            return
        own = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        ckpt_path = self.config[sub].get("ckpt_path")
        wrong = [f"{k}: checkpoint {v} vs model {own[k]}" for k, v in self.ckpt_shapes.items() if k in own and own[k] != v]
        missing = sorted(set(own) - set(self.ckpt_shapes))
        unexpected = sorted(set(self.ckpt_shapes) - set(own))
        if wrong:
            raise ConfigValueError(
                f"--ckpt_path {ckpt_path} does not fit the configured model (another width or class count?): "
                + "; ".join(wrong[:3]) + (f"; ... ({len(wrong) - 3} more)" if len(wrong) > 3 else "")
            )
        if missing or unexpected:
            raise ConfigValueError(
                f"--ckpt_path {ckpt_path} does not match the configured model (another depth or preset?): "
                f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected "
                f"{unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"
            )

    def _scan_val(self) -> None:
        if self.trainer.limit_val_batches == 0:
            return
        self.datamodule.scan("val", progress=self.trainer.is_global_zero)

    def before_fit(self) -> None:
        root = Path(self.trainer.default_root_dir)
        if not self.resuming and holds_run(root):
            raise RunDirectoryError(
                f"run folder {root} already holds a run (config.yaml or checkpoints/): continue it with "
                "--auto-resume, or start a new one with --new-version (or another trainer.default_root_dir)"
            )
        self._check_ckpt_fits("fit")
        self._scan_val()

    def before_validate(self) -> None:
        self._check_ckpt_fits("validate")
        self._scan_val()

    @staticmethod
    def _probe_out(sub: str, out: str | None) -> None:
        """An unwritable ``--out`` fails before the first batch instead of after it."""
        if out is None:
            return
        try:
            probe_dir(out)
        except RunDirectoryError as err:
            raise ConfigValueError(f"--out {out}: cannot write there ({err.__cause__})") from err

    def before_test(self) -> None:
        self._check_ckpt_fits("test")
        self._probe_out("test", self.config["test"].get("out"))

    def before_predict(self) -> None:
        self._check_ckpt_fits("predict")
        self._probe_out("predict", self.config["predict"].out)

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
        interval = cfg.trainer.get("val_check_interval")
        if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval <= 0:
            raise ConfigValueError(
                f"trainer.val_check_interval must be > 0 (a number of steps, or a fraction of an epoch up to "
                f"1.0), got {interval}"
            )
        every = cfg.trainer.get("check_val_every_n_epoch")
        if isinstance(every, int) and every <= 0:
            raise ConfigValueError(f"trainer.check_val_every_n_epoch must be >= 1 or null, got {every}")

    @staticmethod
    def _check_data_paths(data: Namespace, subcommand: str | None) -> None:
        keys = ["root"]
        if str(data.get("dataset", "")).lower() == "scenes":
            keys = []  # scenes.yaml names the files (checked when it is read)
            if not data.get("scenes"):
                raise ConfigValueError("data.scenes is not set: give the path of a scenes.yaml")
            try:
                check_complete(Path(data.get("scenes")).parent)
            except DataError as err:
                raise ConfigValueError(f"data.scenes: {err}") from err
            if not Path(data.get("scenes")).is_file():
                raise ConfigValueError(f"data.scenes: {data.get('scenes')} does not exist")
        if subcommand == "predict":
            keys = ["predict_root"]
        for key in keys:
            value = data.get(key)
            if value is None:
                raise ConfigValueError(f"data.{key} is not set: give the dataset folder")
            try:
                check_complete(value)
            except DataError as err:
                raise ConfigValueError(f"data.{key}: {err}") from err
            if not Path(value).is_dir():
                raise ConfigValueError(f"data.{key}: {value} is not a directory")
        classes_file = data.get("classes_file")
        if classes_file is not None and not Path(classes_file).is_file():
            raise ConfigValueError(f"data.classes_file: {classes_file} does not exist")

    def _link_num_classes(self, cfg: Namespace) -> None:
        """``model.num_classes`` from the dataset's class list (a config value, not a DataModule: the class
        count must be known before anything is built, and a conflicting value is named, not overridden)."""
        data = cfg.data
        try:
            classes = dataset_meta(
                data.get("dataset"), data.get("root") or ".", data.get("classes_file"), data.get("scenes")
            )["classes"]
        except ValueError as err:  # DataError is a ValueError
            raise ConfigValueError(f"data: {err}") from err
        n = len(classes)
        given = cfg.model.get("num_classes")
        if given is None:
            cfg.model.num_classes = n
        elif int(given) != n:
            raise ConfigValueError(
                f"model.num_classes={given} conflicts with data.dataset={data.get('dataset')!r}, which has "
                f"{n} classes ({', '.join(classes)}); drop model.num_classes or fix it"
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


SEGLSTM_FLAGS = {
    "--auto-resume": "fit: continue from this run's newest checkpoint (by global step), or start at step 0 "
    "when it has none (also SEGLSTM_AUTO_RESUME=1, and every torchrun elastic restart)",
    "--new-version": "fit: when the run folder already holds a run, train into the first free <folder>-vN",
    "--unsafe-load": "read checkpoints with full unpickling (runs code from the file: trusted files only)",
    "--allow-class-path MODULE": "let configs name classes from MODULE (repeatable); by default only seglstm, "
    "Lightning's callbacks/loggers/strategies/plugins/profilers and torch.optim",
}


def seglstm_help() -> str:
    """The options seglstm reads before LightningCLI (printed after its ``--help``)."""
    width = max(map(len, SEGLSTM_FLAGS))
    lines = ["", "seglstm options (any position):"]
    lines += [f"  {flag:<{width}}  {text}" for flag, text in SEGLSTM_FLAGS.items()]
    return "\n".join(lines)


def pop_safety_flags(argv: list[str]) -> tuple[list[str], bool, tuple[str, ...], bool, bool]:
    """Take ``--unsafe-load``, ``--allow-class-path MODULE`` (repeatable), ``--auto-resume`` and
    ``--new-version`` out of ``argv``.

    Returns:
        ``(rest, unsafe_load, allowed_modules, auto_resume, new_version)``.
    """
    rest: list[str] = []
    unsafe = auto_resume = new_version = False
    allowed: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--unsafe-load":
            unsafe = True
        elif arg == "--auto-resume":
            auto_resume = True
        elif arg == "--new-version":
            new_version = True
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
    if auto_resume and new_version:
        raise ConfigError("--auto-resume continues this run and --new-version starts another: give one")
    return rest, unsafe, tuple(a for a in allowed if a), auto_resume, new_version


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
        argv, unsafe_load, allowed, auto_resume, new_version = pop_safety_flags(argv)
        expanded, names = expand_configs(argv, allowed)
        # argv is handed over explicitly (composed configs replace file names), which LightningCLI would
        # otherwise report as "args given while sys.argv also has arguments" on every run.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        try:
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
                new_version=new_version,
            )
        except SIGTERMException:  # validate/test/predict: Lightning stops with SystemExit(), i.e. exit status 0
            print(f"\nseglstm {argv[0]}: interrupted by SIGTERM before the end", file=sys.stderr)
            return 128 + int(signal.SIGTERM)
        except SystemExit:
            if any(a in ("-h", "--help") for a in argv):
                print(seglstm_help())
            raise
    except ConfigParseError as err:
        files = [Path(a) for a in argv if Path(a).suffix.lower() in (".yaml", ".yml", ".json") and Path(a).is_file()]
        print(f"\nseglstm {argv[0]}: error: {describe_parse_error(str(err), argv[0], argv, files)}", file=sys.stderr)
        return 2
    except (ConfigError, ConfigValueError) as err:
        print(f"\nseglstm {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"\nseglstm {argv[0]}: {stop}", file=sys.stderr)
        return stop.exit_code
    except (SeglstmError, OSError) as err:
        # A newline first: a progress bar may have left the cursor at the end of its line.
        print(f"\nseglstm {argv[0]}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 1)
    return 0
