"""The scaling and training-throughput benchmark scripts: their helpers on hand-made rows, and (slow) one tiny run
of each through its own command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seglstm.study.measure import run_isolated

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compare_trees
import encoder_speed
import scaling
import training_throughput

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _row(model, side, seconds, peak, part="encoder", batch=1, mode="forward"):
    return {"model": model, "part": part, "side": side, "batch": batch, "mode": mode, "seconds": seconds,
            "peak_mib": peak}  # fmt: skip


def test_growth_ratios_between_consecutive_sizes():
    rows = [
        _row("a", 256, 0.5, 10.0), _row("a", 512, 1.5, 50.0), _row("a", 1024, 7.5, 175.0),
        _row("b", 256, 2.0, 0.0), _row("b", 512, 4.0, 8.0),
        {**_row("b", 1024, 0, 0), "error": "out of memory"},  # failed: no ratio to or from it
        _row("a", 512, 3.0, 20.0, mode="train"), _row("a", 1024, 3.3, 88.0, mode="train"),
    ]  # fmt: skip
    for r in rows:
        if "error" in r:
            del r["seconds"]
    got = {(g["model"], g["mode"], g["sides"]): (g["time x"], g["memory x"]) for g in scaling._growth(rows, [1024, 256, 512])}
    assert got == {
        ("a", "forward", "256->512"): (pytest.approx(3.0), pytest.approx(5.0)),
        ("a", "forward", "512->1024"): (pytest.approx(5.0), pytest.approx(3.5)),
        ("a", "train", "512->1024"): (pytest.approx(1.1), pytest.approx(4.4)),
        ("b", "forward", "256->512"): (pytest.approx(2.0), None),  # no memory ratio from a 0 MiB start
    }


def test_parse_overrides_and_variants():
    assert scaling.parse_overrides(["m:depths=[1, 2]", "m:embed_dim=64", "n:mlstm_backend=parallel"]) == {
        "m": {"depths": [1, 2], "embed_dim": 64},
        "n": {"mlstm_backend": "parallel"},
    }
    with pytest.raises(SystemExit, match="MODEL:KEY=VALUE"):
        scaling.parse_overrides(["m:depths"])
    assert training_throughput.split_variant("seglstm_upernet_s/parallel") == (
        "seglstm_upernet_s",
        {"mlstm_backend": "parallel"},
    )
    assert training_throughput.split_variant("vit_s_upernet") == ("vit_s_upernet", {})
    with pytest.raises(SystemExit, match="must be one of"):
        training_throughput.split_variant("seglstm_upernet_s/fast")


def _allocate_under_cap(cap_gib: float, mib: int) -> dict:
    scaling.limit_memory(cap_gib, torch.device("cpu"))
    return {"sum": float(torch.ones(mib * 2**18).sum())}  # float32: 4 bytes each


def test_memory_cap_turns_an_oversized_allocation_into_an_error():
    assert run_isolated(_allocate_under_cap, cap_gib=0.5, mib=64) == {"sum": 64 * 2**18}
    failed = run_isolated(_allocate_under_cap, cap_gib=0.5, mib=2048)
    assert "memory" in failed["error"].lower()


@pytest.mark.slow  # each configuration is a fresh process importing torch and timm
def test_scaling_smoke(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    code = scaling.main([
        "--models", "deeplabv3plus_r18", "--parts", "encoder,segmentor", "--sizes", "32", "64", "--batches", "1",
        "--modes", "train", "--repeats", "1", "--device", "cpu", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert [(r["part"], r["side"]) for r in rows] == [("encoder", 32), ("segmentor", 32), ("encoder", 64), ("segmentor", 64)]
    for r in rows:
        assert "error" not in r, r
        assert r["seconds"] > 0 and r["images_per_s"] == pytest.approx(1 / r["seconds"]) and r["weights_mib"] > 0
    seg = next(r for r in rows if r["part"] == "segmentor")
    enc = next(r for r in rows if r["part"] == "encoder")
    assert seg["weights_mib"] > enc["weights_mib"]  # heads add weights on top of the same backbone
    assert {g["sides"] for g in payload["growth"]} == {"32->64"}
    assert "| model" in capsys.readouterr().out


@pytest.mark.slow  # a fresh process per model
def test_training_throughput_smoke(tmp_path):
    out = tmp_path / "tt.json"
    code = training_throughput.main([
        "--models", "deeplabv3plus_r18,pspnet_r18", "--size", "64", "--batch", "2", "--steps", "1", "--warmup", "0",
        "--device", "cpu", "--model-overrides", "pspnet_r18:no_such_option=1", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    payload = json.loads(out.read_text())
    ok, bad = payload["rows"]
    assert ok["model"] == "deeplabv3plus_r18" and ok["steps_per_s"] == pytest.approx(1 / ok["seconds"])
    assert ok["images_per_s"] == pytest.approx(2 * ok["steps_per_s"]) and ok["peak_mib"] > 0
    assert "no_such_option" in bad["error"]  # a failing model is a row with its error


@pytest.mark.slow  # every stage is a fresh process; full-size encoders on the CPU (minutes)
def test_gpu_check_cpu_dry_run(tmp_path):
    """benchmarks/gpu_check.py runs end to end: every stage, one table, no failed check."""
    out = tmp_path / "gc"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--cpu-dry-run", "--out", str(out)],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines() if ln.strip()]
    stages = {r["stage"] for r in rows}
    assert stages >= {"env", "cell", "triton", "amp", "enc_vil_s", "enc_vit_s", "enc_swin_t", "train_seglstm",
                      "train_vit", "train_swin", "scene", "synth", "fit"}  # fmt: skip
    assert not [r for r in rows if r["status"] == "FAIL"], [r for r in rows if r["status"] == "FAIL"]
    checks = {(r["stage"], r["check"]): r["status"] for r in rows}
    # The correctness stages pass on any machine; speed stages may run out of their time on a loaded CPU.
    cell = [s for (stage, _), s in checks.items() if stage == "cell" and _ != "reference" and "exit" not in _]
    assert len(cell) == 9 and set(cell) == {"PASS"}
    assert {s for (stage, c), s in checks.items() if stage == "amp" and "exit" not in c} == {"PASS"}
    assert checks[("fit", "seglstm fit 6 steps")] == "PASS"
    assert "seglstm GPU check:" in proc.stdout and (out / "summary.txt").read_text() in proc.stdout + "\n"


@pytest.mark.slow  # builds seglstm_upernet_s and segments a small scene on the CPU (about a minute)
def test_gpu_check_scene_stage_reports_throughput_and_busy_share_on_the_cpu(tmp_path):
    """The predict-scene stage of gpu_check.py alone, in its CPU dry-run form (tiny scene and tile)."""
    results = tmp_path / "results.jsonl"
    env = {**os.environ, "GC_RESULTS": str(results), "GC_DEVICE": "cpu", "GC_TINY": "1", "GC_STAGE": "scene",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"),
                                                                      os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--stage", "scene"], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = [json.loads(ln) for ln in results.read_text().splitlines() if ln.strip()]
    assert row["check"] == "predict-scene 256x256 vil_s fp32 tile 128" and row["status"] == "PASS", row
    data = row["data"]
    assert 0 < data["busy_s"] < data["wall_s"]  # the forwards are part of the run, not all of it
    assert "Mpx/s" in row["value"] and f"{data['busy_s'] / data['wall_s']:.0%}" in row["value"]
    assert data["profile"]["forward"] > 0 and data["profile"]["reader"] > 0


@pytest.mark.slow  # two mamba_upernet training steps at 256x256 on the CPU (minutes)
def test_mamba_upernet_trains_under_a_memory_cap_with_the_chunked_scan():
    """The reduced-size twin of benchmarks/mamba_memory.py: at 256x256, batch 2, a training step (forward,
    loss, backward, AdamW) fits in 3 GiB of address space with the chunked scan; the whole-sequence scan
    ((B, L, D, N) states) does not."""
    from training_throughput import capped_training_speed

    common = dict(max_mem_gib=3.0, name="mamba_upernet", num_classes=7, size=256, batch=2, device="cpu",
                  repeats=1, warmup=0)  # fmt: skip
    chunked = run_isolated(capped_training_speed, timeout=1800, overrides={"scan_chunk_size": "auto"}, **common)
    assert "error" not in chunked, chunked
    assert 0 < chunked["peak_mib"] < 3 * 1024
    whole = run_isolated(capped_training_speed, timeout=1800, overrides={"scan_chunk_size": None}, **common)
    assert "memory" in whole.get("error", "").lower(), whole


def test_encoder_speed_ratios_compare_within_one_precision_and_each_precision_to_fp32():
    def row(model, precision, side, seconds=None):
        r = {"model": model, "precision": precision, "side": side}
        return r if seconds is None else {**r, "seconds": seconds}

    rows = [
        row("vil_s/chunkwise", "fp32", 512, 2.0), row("swin_t (timm)", "fp32", 512, 1.6),
        row("vil_s/chunkwise", "bf16", 512, 0.8), row("swin_t (timm)", "bf16", 512, 1.0),
        row("vil_s/parallel", "fp32", 512), row("vil_s/parallel", "bf16", 512, 3.0),  # fp32 row failed
        row("vil_s/chunkwise", "int8", 512, 4.0), row("swin_t (timm)", "int8", 512, 0.5),
    ]  # fmt: skip
    got = {(r["side"], r["precision"], r["ratio"]): r["value"] for r in
           encoder_speed.ratios(rows, [512], ["fp32", "bf16", "int8"])}
    assert got == {
        (512, "fp32", "vil_s/chunkwise / swin_t (timm)"): pytest.approx(1.25),
        (512, "bf16", "vil_s/chunkwise / swin_t (timm)"): pytest.approx(0.8),
        (512, "bf16", "vil_s/chunkwise / vil_s/parallel"): pytest.approx(0.8 / 3.0),
        (512, "-", "vil_s/chunkwise fp32/bf16"): pytest.approx(2.5),
        (512, "-", "swin_t (timm) fp32/bf16"): pytest.approx(1.6),
        (512, "int8", "vil_s/chunkwise / swin_t (timm)"): pytest.approx(8.0),
        (512, "-", "vil_s/chunkwise fp32/int8"): pytest.approx(0.5),
        (512, "-", "swin_t (timm) fp32/int8"): pytest.approx(3.2),
    }


@pytest.mark.parametrize("model", ["vil_s/chunkwise", "swin_t (timm)"])
def test_encoder_speed_measures_each_model_in_bf16_at_a_side_the_window_does_not_divide(model):
    """Swin-T at 96 (24 patches, window 7: padded, not its 224 default) and vil_s, under CPU bf16 autocast."""
    res = encoder_speed.measure(model, 96, "cpu", slow=True, precision="bf16")
    assert res["seconds"] > 0 and res["peak_mib"] >= 0


def test_compare_trees_takes_the_minimum_per_tree_and_the_ratio_and_refuses_mismatched_rows():
    def rows(*ms):
        return [{"backend": b, "tokens": 64, "cpu_ms": m} for b, m in zip(("chunkwise", "parallel"), ms)]

    runs = {"baseline": [rows(10.0, 40.0), rows(12.0, 36.0)], "current": [rows(9.0, 50.0), rows(11.0, 45.0)]}
    table, columns = compare_trees.merge(runs)
    assert columns == ["backend", "tokens", "cpu_ms baseline", "cpu_ms current", "cpu_ms ratio"]
    assert [(r["cpu_ms baseline"], r["cpu_ms current"]) for r in table] == [(10.0, 9.0), (36.0, 45.0)]
    assert [r["cpu_ms ratio"] for r in table] == pytest.approx([0.9, 1.25])
    runs["current"][1][0]["tokens"] = 128
    with pytest.raises(ValueError, match="row 0 differs"):
        compare_trees.merge(runs)
