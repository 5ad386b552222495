"""The benchmark scripts run end to end on tiny budgets (slow) and print their contract lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, data_dir


def _run(args: list[str], timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QUANTSR_DATA": str(data_dir())}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_gpu_bench_says_unavailable_without_gpu() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the real benchmark is run by hand")
    result = _run(["bench/gpu_inference.py"], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("speedup_vs_fp16=unavailable")


@pytest.mark.slow
def test_compare_methods_smoke_and_resume(tmp_path: Path, shared_data: Path) -> None:
    args = ["bench/compare_methods.py", "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "m.json"),
            "--rows-dir", str(tmp_path / "rows"),
            "--methods", "rbd", "lsq", "--bits", "2", "--blocks", "1", "--iters", "2", "--fp-iters", "2", "--batch", "2",
            "--patch", "32", "--imdn-iters", "1", "--imdn-batch", "2", "--imdn-patch", "32", "--threads", "1"]
    first = _run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "m.json").read_text())
    labels = [r["label"] for r in result["rows"]]
    assert labels[0] == "Bicubic" and "IMDN FP32" in labels and "imdn_rbd_w2a2" in labels
    assert len(result["dqa"]) == 6
    assert (tmp_path / "m.md").read_text().startswith("| model |")
    again = _run(args)  # every run is finished: nothing is retrained
    assert again.returncode == 0 and "training" not in again.stderr
    # a later session on a fresh machine keeps only the committed rows: still nothing is retrained
    fresh = [a if a != str(tmp_path / "w") else str(tmp_path / "fresh") for a in args]
    later = _run(fresh)
    assert later.returncode == 0 and "training" not in later.stderr and "reusing" in later.stderr
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == result["rows"]
    report = _run(fresh + ["--report-only", "--bits", "2", "4"])  # trains nothing, lists what is missing
    assert report.returncode == 0 and "training" not in report.stderr
    missing = json.loads((tmp_path / "m.json").read_text())["missing"]
    assert "imdn_rbd_w4a4" in missing and "imdn_rbd_w2a2" not in missing
    changed = _run(fresh[:fresh.index("--iters") + 1] + ["3"] + fresh[fresh.index("--iters") + 2:])
    assert changed.returncode == 0 and "other settings" in changed.stderr and "training" in changed.stderr


@pytest.mark.slow
def test_quantsr_plus_ablation_smoke(tmp_path: Path, shared_data: Path) -> None:
    args = ["bench/ablation_quantsr_plus.py", "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "a.json"),
            "--blocks", "2", "--slim-to", "1", "--teacher-iters", "2", "--iters", "4", "--batch", "2",
            "--patch", "32", "--val-every", "1", "--threads", "1"]
    first = _run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = {r["label"]: r for r in json.loads((tmp_path / "a.json").read_text())["rows"]}
    assert list(rows) == ["FP32 teacher", "RBD", "RBD+SFD", "RBD+QSA", "RBD+QSA+SFD"]
    assert rows["RBD"]["blocks"] == 2 and rows["RBD+QSA"]["blocks"] == 1
    assert rows["RBD+QSA"]["params"] < rows["RBD"]["params"]  # the slimmed file really lost a block
    assert rows["RBD+QSA"]["macs_g"] < rows["RBD"]["macs_g"]
    again = _run(args)
    assert again.returncode == 0 and "training" not in again.stderr


@pytest.mark.slow
def test_qartsr_compare_smoke_two_processes_share_one_table(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "q.json"
    base = ["bench/qartsr_compare.py", "--smoke", "--out", str(out), "--model", str(tmp_path / "osd" / "osd_sr_tiny_x4.safetensors"),
            "--state-dir", str(tmp_path / "state"), "--methods", "ptq-minmax", "rpq", "trq+rpq+et", "--threads", "1"]
    train = _run(base + ["--train-only"])
    assert train.returncode == 0, train.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QUANTSR_DATA": str(shared_data)}
    procs = [subprocess.Popen([sys.executable, *base, "--bits", b], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for b in ("4", "2")]
    for p in procs:
        _, err = p.communicate(timeout=1800)
        assert p.returncode == 0, err[-3000:]
    results = json.loads(out.read_text())
    rows = results["rows"]
    assert {"bicubic", "fp"} <= set(rows)
    for b in ("4", "2"):  # both processes' rows survived each other's writes
        for m in ("ptq-minmax", "rpq", "trq+rpq+et"):
            assert f"{m}@w{b}a{b}" in rows, m
        sweep = results["trq"][f"sweep_w{b}a{b}"]
        assert [r["timestep"] for r in sweep] == [999, 249] and all("image_psnr_vs_ref" in r for r in sweep)
        assert rows[f"trq+rpq+et@w{b}a{b}"]["report"]["trq_selected_timestep"] in (999, 249)
    assert set(results["trq"]["fp_eval"]) == {"999", "249"}
    for ds in ("Set5", "Set14"):  # T=999 is the original model
        assert results["trq"]["fp_eval"]["999"][ds]["psnr"] == rows["fp"]["metrics"][ds]["psnr"]
    for r in rows.values():  # a 6-step smoke model is poor: only check the numbers are real measurements
        assert 5 < r["metrics"]["Set5"]["psnr"] < 60 and 0 < r["metrics"]["Set14"]["ssim"] <= 1
    assert len(list((tmp_path / "state").glob("trq_*_T*.safetensors"))) == 1  # retrained once, not per process
    md = out.with_suffix(".md").read_text()
    assert "| rpq | W4A4 |" in md and "| rpq | W2A2 |" in md
    again = _run(base + ["--bits", "4", "2"])  # everything measured: nothing is redone
    assert again.returncode == 0 and "==" not in again.stdout
    trq_changed = _run(base + ["--bits", "4", "--trq-target", "gt"])  # only the TRQ rows depend on TRQ settings
    assert trq_changed.returncode == 0, trq_changed.stderr[-3000:]
    assert "== trq+rpq+et@w4a4" in trq_changed.stdout and "== rpq@" not in trq_changed.stdout
    rows = json.loads(out.read_text())["rows"]
    assert "rpq@w2a2" in rows and "trq+rpq+et@w2a2" not in rows  # measured with the old TRQ settings: dropped


@pytest.mark.slow
def test_cpu_peers_smoke_and_cache(tmp_path: Path, shared_data: Path) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    args = ["bench/cpu_peers.py", "--repeat", "1", "--threads", "1", "--sizes", "256", "--models", "default",
            "--no-psnr", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "peers.json")]
    first = _run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "peers.json").read_text())
    assert {"torch_fp32", "ov_int8_nncf", "default_ov", "default_cpu"} <= set(result["rows"])
    assert result["ratios"]["default/t1_256"]["vs_ov_int8_nncf_min"] > 0 and result["version"]
    second = _run(args)  # everything cached: same numbers
    assert second.returncode == 0 and json.loads((tmp_path / "peers.json").read_text())["rows"] == result["rows"]
