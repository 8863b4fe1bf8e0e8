"""``seglstm compare``: argument parsing, the budget callback's schedule, the table files, isolated children,
and one end-to-end run with two tiny models and a failing one."""

from __future__ import annotations

import csv
import json
import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from seglstm.cli.compare import main as compare_main
from seglstm.cli.compare import parse_budget, parse_ckpts, parse_model_overrides, parse_sizes
from seglstm.models.flops import count_flops, count_params
from seglstm.models.registry import create_model
from seglstm.study import compare as cmp
from seglstm.study import jobs, measure, tables
from seglstm.training.optim import WarmupPoly

CLASSES = ["background", "building", "road", "water", "barren", "forest", "agricultural"]


# -- parsing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "steps", "minutes"),
    [("200", 200, None), (" 2 ", 2, None), ("10m", None, 10.0), ("1.5min", None, 1.5), ("3 minutes", None, 3.0)],
)
def test_parse_budget(text, steps, minutes):
    budget = parse_budget(text)
    assert (budget.steps, budget.minutes) == (steps, minutes)


@pytest.mark.parametrize("text", ["", "abc", "1", "0", "-5", "10h", "0m", "5s", "2.5"])
def test_parse_budget_rejects(text):
    with pytest.raises(ValueError, match="--budget"):
        parse_budget(text)


def test_parse_model_overrides_yaml_values():
    got = parse_model_overrides(
        ["a:depths=[1,1,2,1]", "a:embed_dim=32", "b:depths=(2, 2)", "b:backend=parallel", "a:lr=1e-3"], ["a", "b"]
    )
    assert got == {"a": {"depths": [1, 1, 2, 1], "embed_dim": 32, "lr": 1e-3}, "b": {"depths": [2, 2], "backend": "parallel"}}
    with pytest.raises(ValueError, match="not one of --models"):
        parse_model_overrides(["c:x=1"], ["a"])
    with pytest.raises(ValueError, match="MODEL:KEY=VALUE"):
        parse_model_overrides(["a:x"], ["a"])
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_model_overrides(["a:x=[1,"], ["a"])


def test_parse_ckpts_and_sizes(tmp_path):
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"x")
    assert parse_ckpts(f"a={ckpt}", ["a", "b"]) == {"a": ckpt}
    assert parse_ckpts(None, ["a"]) == {}
    with pytest.raises(ValueError, match="does not exist"):
        parse_ckpts(f"a={tmp_path / 'missing.ckpt'}", ["a"])
    with pytest.raises(ValueError, match="not one of --models"):
        parse_ckpts(f"z={ckpt}", ["a"])
    assert parse_sizes("512,1024") == [512, 1024]
    for bad in ("", "512,abc", "8", "512,512"):
        with pytest.raises(ValueError, match="--sizes"):
            parse_sizes(bad)


def test_parse_devices_on_cpu():
    assert cmp.parse_devices("auto", "cpu") == ("cpu", 1, "cpu")
    assert cmp.parse_devices("1", "cpu") == ("cpu", 1, "cpu")
    with pytest.raises(ValueError, match="one device"):
        cmp.parse_devices("2", "cpu")
    with pytest.raises(ValueError, match="--accelerator"):
        cmp.parse_devices("1", "tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            cmp.parse_devices("3,", "auto")


def test_warmup_for_matches_seed_share():
    assert jobs.warmup_for(15000, cmp.SEED_WARMUP_FRACTION) == 1500
    assert jobs.warmup_for(200, 0.1) == 20
    assert jobs.warmup_for(10, 0.1) == 0  # one warm-up step is not a valid WarmupPoly
    assert jobs.warmup_for(4, 0.5) == 2
    assert jobs.warmup_for(3, 0.5) == 0  # 2 + 2 > 3 steps
    for steps in (2, 3, 7, 50):
        warm = jobs.warmup_for(steps, 0.3)
        WarmupPoly(steps, warm)  # always a valid schedule


def test_load_study_data(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data": {"dataset": "loveda", "batch_size": 8}}))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "_base_": ["base.yaml"],
        "data": {"root": "somewhere", "batch_size": 4},
        "model": {"model": "vit_s_upernet", "lr": 1e-3, "warmup_iters": 300, "test_cfg": {"mode": "whole"}},
        "trainer": {"max_steps": 1200, "gradient_clip_val": 1.0},
    }))  # fmt: skip
    study = cmp.load_study_data(cfg, {"batch_size": 2, "crop_size": [64, 64]})
    assert study.data == {"dataset": "loveda", "root": "somewhere", "batch_size": 2, "crop_size": [64, 64]}
    assert study.recipe == {"lr": 1e-3, "test_cfg": {"mode": "whole"}}
    assert study.warmup_fraction == pytest.approx(0.25)
    assert study.gradient_clip_val == 1.0 and study.precision == "auto"
    assert study.ignored == ["model"]
    nodata = tmp_path / "nodata.yaml"
    nodata.write_text("model: {lr: 0.1}\n")
    with pytest.raises(ValueError, match="no data section"):
        cmp.load_study_data(nodata)
    with pytest.raises(ValueError, match="does not exist"):
        cmp.load_study_data(tmp_path / "missing.yaml")
    seedless = tmp_path / "plain.yaml"
    seedless.write_text("data: {dataset: loveda}\n")
    assert cmp.load_study_data(seedless).warmup_fraction == pytest.approx(0.1)


# -- the budget callback --------------------------------------------------------------------------------


def _fake_trainer(max_iters: int, warmup: int) -> SimpleNamespace:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupPoly(max_iters, warmup))
    return SimpleNamespace(global_step=0, should_stop=False, lr_scheduler_configs=[SimpleNamespace(scheduler=sched)])


def _steps(cb: jobs.BudgetCallback, trainer: SimpleNamespace, clock, durations: list[float], batch: int) -> None:
    images = {"image": torch.zeros(batch, 3, 4, 4)}
    for d in durations:
        if trainer.should_stop:
            break
        clock.advance(d)
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, None, None, images, trainer.global_step - 1)


def test_budget_callback_fits_the_schedule_to_the_time(fake_clock):
    clock = fake_clock
    trainer = _fake_trainer(10**9, jobs.warmup_for(10**9, 0.1))
    cpu = torch.device("cpu")
    cb = jobs.BudgetCallback(None, 60.0, 0.1, cpu, measure.memory_baseline(cpu), clock=clock)
    cb.on_train_start(trainer, None)
    _steps(cb, trainer, clock, [5.0] + [2.0] * 100, batch=2)
    # probe: step 2 takes 2 s; 7 s used at step 2 -> 2 + (60 - 7) // 2 = 28 planned steps
    assert cb.planned == 28
    schedule = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert (schedule.max_iters, schedule.warmup_iters) == (28, 3)
    assert trainer.should_stop and trainer.global_step == 28
    cb.on_train_end(trainer, None)
    stats = cb.stats()
    assert stats["steps"] == 28 and stats["stop_reason"] == "steps"
    assert stats["train_seconds"] == pytest.approx(5.0 + 27 * 2.0)
    assert stats["images_per_s"] == pytest.approx(27 * 2 / (27 * 2.0))  # steps 2..28, from the end of step 1
    # the lr the scheduler would give at the last step is the poly schedule's end: 0
    assert schedule(27) == pytest.approx(0.0)


def test_budget_callback_hard_stop_when_steps_slow_down(fake_clock):
    clock = fake_clock
    trainer = _fake_trainer(10**9, 0)
    cb = jobs.BudgetCallback(None, 30.0, 0.0, torch.device("cpu"), 0.0, clock=clock)
    cb.on_train_start(trainer, None)
    _steps(cb, trainer, clock, [1.0, 1.0, 1.0] + [5.0] * 100, batch=1)
    assert cb.planned == 2 + 28  # planned at 1 s per step, 2 s used
    assert cb.stop_reason == "time" and trainer.global_step == 3 + 6  # 3 s + 6 x 5 s >= 30 s
    assert clock.now == pytest.approx(33.0)


def test_budget_callback_step_budget_only_measures(fake_clock):
    clock = fake_clock
    trainer = _fake_trainer(5, 0)
    cb = jobs.BudgetCallback(5, None, 0.1, torch.device("cpu"), 0.0, clock=clock)
    cb.on_train_start(trainer, None)
    _steps(cb, trainer, clock, [3.0, 1.0, 2.0, 1.0, 2.0], batch=4)
    assert not trainer.should_stop  # Lightning's max_steps stops a step budget
    assert cb.stats()["images_per_s"] == pytest.approx(4 * 4 / 6.0)


def test_budget_callback_reschedules_through_warmup_poly_only():
    schedule = WarmupPoly(10**9, 20)
    schedule.reschedule(40, 4)
    assert (schedule.max_iters, schedule.warmup_iters) == (40, 4) and schedule(39) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="warmup_iters must be 0"):
        schedule.reschedule(40, 1)  # checked as the constructor checks it; the schedule is left as it was
    assert (schedule.max_iters, schedule.warmup_iters) == (40, 4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    other = SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(scheduler=torch.optim.lr_scheduler.StepLR(opt, 5))])
    cb = jobs.BudgetCallback(None, 60.0, 0.1, torch.device("cpu"), 0.0)
    with pytest.raises(RuntimeError, match="exactly one WarmupPoly schedule, found 0"):
        cb._reschedule(other, 30)


# -- table files ----------------------------------------------------------------------------------------


def _result(miou_parts: list[float | None]) -> dict:
    per_class = {c: {"IoU": v} for c, v in zip(CLASSES, miou_parts)}
    finite = [v for v in miou_parts if v is not None]
    return {
        "errors": {},
        "overrides": {"depths": [1, 2], "embed_dim": 32},
        "run": {
            "train": {"steps": 40, "train_seconds": 90.0},
            "metrics": {"mIoU": sum(finite) / len(finite), "mFscore": 0.5, "aAcc": 0.75, "per_class": per_class},
        },
        "complexity": {"params": 12_345_678, "flops": 98_700_000_000},
        "train_speed": {"images_per_s": 3.25, "peak_mib": 1234.4},
        "inference": {"512": {"images_per_s": 10.0, "peak_mib": 200.0}, "1024": {"images_per_s": 2.5, "peak_mib": 700.0}},
    }


def test_rows_tables_and_plots(tmp_path, rng):
    ious = [float(v) for v in rng.uniform(0.05, 0.95, len(CLASSES))]
    ious[4] = None  # a class absent from the split: NaN in mmseg, null in JSON
    good = tables.build_row("a", _result(ious), CLASSES, [512, 1024])
    bad = tables.build_row("b", {"errors": {"train": "RuntimeError: boom\nmore lines"}, "complexity": {"params": 5, "flops": 7}},
                        CLASSES, [512, 1024])  # fmt: skip
    pending = tables.build_row("c", {"pending": True}, CLASSES, [512, 1024])
    cols = tables.table_columns(CLASSES, [512, 1024])
    assert list(good) == cols
    assert good["overrides"] == "depths=[1, 2] embed_dim=32"
    assert good["status"] == "ok" and good["steps"] == 40 and good["train_min"] == pytest.approx(1.5)
    assert good["IoU.road"] == pytest.approx(100 * ious[2]) and good["IoU.barren"] is None
    finite = [v for v in ious if v is not None]
    assert good["mIoU"] == pytest.approx(100 * sum(finite) / len(finite))
    assert (good["mF1"], good["OA"]) == (pytest.approx(50.0), pytest.approx(75.0))
    assert good["params_M"] == pytest.approx(12.345678) and good["GFLOPs_512"] == pytest.approx(98.7)
    assert (good["infer_img_s_1024"], good["infer_mem_MiB_512"], good["train_mem_MiB"]) == (2.5, 200.0, 1234.4)
    assert bad["overrides"] is None
    assert bad["status"] == "train failed: RuntimeError: boom" and bad["mIoU"] is None and bad["params_M"] == 5e-6
    assert pending["status"] == "pending"

    md = tables.markdown_table([good, bad], cols).splitlines()
    assert md[0].startswith("| model | overrides | status | steps | train min | IoU.background")
    assert "GFLOPs@512" in md[0] and "infer img/s@1024" in md[0] and "infer peak MiB@1024" in md[0]
    cells = [c.strip() for c in md[2].strip("|").split("|")]
    assert len(cells) == len(cols)
    assert cells[cols.index("mIoU")] == f"{100 * sum(finite) / len(finite):.2f}"
    assert cells[cols.index("IoU.barren")] == "-"
    assert cells[cols.index("params_M")] == "12.3"

    text = tables.csv_text([good, bad], cols)
    back = list(csv.DictReader(text.splitlines()))
    assert list(back[0]) == cols
    assert float(back[0]["IoU.road"]) == pytest.approx(100 * ious[2]) and back[0]["IoU.barren"] == ""
    assert back[1]["status"] == "train failed: RuntimeError: boom"

    from seglstm.study.plots import plot_miou_vs_time, plot_time_vs_size

    for path in (plot_miou_vs_time([good, bad], 512, tmp_path / "a.png"), plot_time_vs_size([good, bad], [512, 1024], tmp_path / "b.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- measurements and isolation -------------------------------------------------------------------------


def test_complexity_on_meta_matches_a_real_model():
    torch.manual_seed(0)
    real = create_model("deeplabv3plus_r18", num_classes=5)
    got = measure.complexity("deeplabv3plus_r18", 5, {}, size=64)
    assert got == {"params": count_params(real), "flops": count_flops(real, (1, 3, 64, 64))}


def test_complexity_of_a_vil_segmentor_on_meta_matches_a_real_model():
    """The ViL layer switches autocast off around its cell; on ``meta`` (no autocast there) that is a no-op."""
    overrides = {"depths": (1, 1, 1, 1), "embed_dim": 32}
    torch.manual_seed(0)
    real = create_model("seglstm_upernet_t", num_classes=5, **overrides)
    got = measure.complexity("seglstm_upernet_t", 5, overrides, size=64)
    assert got["params"] == count_params(real)
    # the CPU inference path folds the normaliser into the value GEMM (one extra column): a few more FLOPs
    assert got["flops"] == pytest.approx(count_flops(real, (1, 3, 64, 64)), rel=1e-3)


def test_time_call_is_the_median_after_warmup(fake_clock):
    calls = []
    durations = iter([0.2, 0.01, 0.05, 0.03])

    def fn():
        calls.append(1)
        fake_clock.advance(next(durations))

    t = measure.time_call(fn, torch.device("cpu"), repeats=3, warmup=1, clock=fake_clock)
    assert len(calls) == 4
    assert t == pytest.approx(0.03)  # the median of 0.01, 0.05, 0.03 and not the 0.2 s warm-up
    with pytest.raises(ValueError, match="repeats"):
        measure.time_call(fn, torch.device("cpu"), repeats=0)


def _allocate(mib: int) -> dict:
    block = np.ones(mib * 2**20, dtype=np.uint8)  # touched pages count in the resident set
    return {"sum": int(block[:: 2**12].sum()), "pid": os.getpid()}


def _fail() -> dict:
    raise RuntimeError("deliberate failure")


def _die() -> dict:
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def _peak(mib: int) -> dict:
    base = measure.memory_baseline(torch.device("cpu"))
    _allocate(mib)
    return {"peak_mib": measure.peak_memory_mib(torch.device("cpu"), base)}


def test_run_isolated_results_errors_and_kills():
    ok = measure.run_isolated(_allocate, mib=3)
    assert ok["sum"] == 3 * 2**20 // 2**12 and ok["pid"] != os.getpid()
    failed = measure.run_isolated(_fail)
    assert failed["error"] == "RuntimeError: deliberate failure" and "deliberate failure" in failed["traceback"]
    killed = measure.run_isolated(_die)
    assert "killed by signal 9" in killed["error"]
    small, large = (measure.run_isolated(_peak, mib=m)["peak_mib"] for m in (40, 240))
    assert 35 <= small < 120 and 235 <= large < 320  # each child starts from its own baseline


# -- end to end (slow: two tiny models trained for 2 steps, tested, timed, each in child processes) -------


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, tiny_loveda):
    root = tmp_path_factory.mktemp("compare")
    data = tiny_loveda
    cfg = root / "data.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"dataset": "loveda", "root": str(data), "batch_size": 2, "num_workers": 0, "crop_size": [64, 64],
                 "train_scale": [128, 64], "test_scale": [64, 64]},
        "model": {"model": "ignored_here", "warmup_iters": 0, "test_cfg": {"mode": "whole"}},
        "trainer": {"max_steps": 100},
    }))  # fmt: skip
    out = root / "out"
    args = [
        "--models", "seglstm_upernet_t,deeplabv3plus_r18,pspnet_r18", "--data", str(cfg), "--budget", "2",
        "--model-overrides", "seglstm_upernet_t:depths=[1,1,1,1]", "seglstm_upernet_t:embed_dim=32",
        "seglstm_upernet_t:channels=32", "pspnet_r18:no_such_option=1",
        "--sizes", "64", "--flops-size", "64", "--repeats", "1", "--out", str(out), "--quiet",
    ]  # fmt: skip
    return compare_main(args), out, cfg, args


@pytest.mark.slow  # a few minutes on the shared 2-core CPU (Lightning fit/test in child processes)
def test_compare_end_to_end_writes_every_file(tiny_study):
    code, out, _, _ = tiny_study
    assert code == 1  # one model failed, and the exit status says so
    for name in ("compare.md", "compare.json", "compare.csv", "miou_vs_time.png", "time_vs_size.png"):
        assert (out / name).stat().st_size > 0, name
    payload = json.loads((out / "compare.json").read_text())
    cols = tables.table_columns(CLASSES, [64], 64)
    assert payload["columns"] == cols and payload["classes"] == CLASSES
    rows = {r["model"]: r for r in payload["rows"]}
    assert list(rows) == ["seglstm_upernet_t", "deeplabv3plus_r18", "pspnet_r18"]
    with open(out / "compare.csv", newline="") as fh:
        assert [r["model"] for r in csv.DictReader(fh)] == list(rows)
    for name in ("seglstm_upernet_t", "deeplabv3plus_r18"):
        row, res = rows[name], payload["models"][name]
        assert row["status"] == "ok", row["status"]
        tiny = "depths=[1, 1, 1, 1] embed_dim=32 channels=32"
        assert row["overrides"] == (tiny if name == "seglstm_upernet_t" else None)
        assert set(res["load_average_1m"]) == {"start", "end"}
        assert row["steps"] == 2 and (out / name / "checkpoints" / "last.ckpt").is_file()
        assert (out / name / "logs" / "version_0" / "metrics.csv").is_file()
        ious = [row[f"IoU.{c}"] for c in CLASSES if row[f"IoU.{c}"] is not None]
        assert row["mIoU"] == pytest.approx(sum(ious) / len(ious))
        assert row["mIoU"] == pytest.approx(100 * res["run"]["metrics"]["mIoU"])
        real = create_model(name, num_classes=7, **res["overrides"])
        assert row["params_M"] == pytest.approx(count_params(real) / 1e6)
        for col in ("train_img_s", "infer_img_s_64", "train_mem_MiB", "infer_mem_MiB_64", "GFLOPs_64"):
            assert row[col] is not None and row[col] > 0, (name, col)
    failed = rows["pspnet_r18"]
    assert failed["status"].startswith("build failed: TypeError") and "no_such_option" in failed["status"]
    assert (out / "pspnet_r18" / "error_build.txt").is_file()
    md = (out / "compare.md").read_text()
    assert "synthetic LoveDA-like scenes" in md and "not real imagery" in md
    assert "| pspnet_r18 | no_such_option=1 | build failed: TypeError" in md
    assert payload["settings"]["ignored_config_keys"] == ["model"]
    machine = payload["settings"]["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["torch"] == torch.__version__


@pytest.mark.slow  # a few minutes on the shared 2-core CPU (Lightning fit/test in child processes)
def test_compare_evaluates_a_checkpoint_to_the_same_metrics(tiny_study, run_dir):
    _, out, cfg, _ = tiny_study
    ckpt = out / "deeplabv3plus_r18" / "checkpoints" / "last.ckpt"
    trained = json.loads((out / "deeplabv3plus_r18" / "result.json").read_text())
    code = compare_main([
        "--models", "deeplabv3plus_r18", "--data", str(cfg), "--budget", "2", "--ckpts", f"deeplabv3plus_r18={ckpt}",
        "--sizes", "64", "--flops-size", "64", "--repeats", "1", "--out", str(run_dir), "--quiet",
    ])  # fmt: skip
    assert code == 0
    res = json.loads((run_dir / "deeplabv3plus_r18" / "result.json").read_text())
    assert res["run"]["mode"] == "evaluate"
    assert res["run"]["metrics"] == trained["run"]["metrics"]
    assert res["train_speed"]["source"] == "timed steps on random data"


@pytest.mark.slow
def test_compare_reuse_keeps_finished_models(tiny_study, capsys):
    _, out, _, args = tiny_study
    finished = ("seglstm_upernet_t", "deeplabv3plus_r18")
    before = {m: (out / m / "result.json").read_text() for m in finished}
    assert compare_main([*args, "--reuse"]) == 1  # the failed model is tried again, and fails again
    # nothing trained or timed again: a rerun would change the measured speeds in result.json
    assert {m: (out / m / "result.json").read_text() for m in finished} == before
    printed = capsys.readouterr().out
    assert all(f"compare: {m}: reusing" in printed for m in finished)


def test_compare_cli_errors_are_clear(tmp_path, capsys):
    assert compare_main(["--models", "deeplabv3plus_r18", "--data", str(tmp_path / "x.yaml"), "--budget", "5"]) == 2
    assert "x.yaml: config file does not exist" in capsys.readouterr().err
    cfg = tmp_path / "d.yaml"
    cfg.write_text("data: {dataset: loveda, root: " + str(tmp_path) + "}\n")
    assert compare_main(["--models", "no_such_model", "--data", str(cfg), "--budget", "5"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert compare_main(["--models", "deeplabv3plus_r18", "--data", str(cfg), "--budget", "1h"]) == 2
    assert "--budget '1h'" in capsys.readouterr().err
