"""The README is a front page whose numbers come from committed JSON; docs/results.md is generated from
``bench/results/*.json`` by ``bench/report.py`` and regenerates byte-identically; bench results carry the
code version, and cached rows are reused only by the same code version.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BENCH = REPO / "bench"


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_results_document_and_readme_regenerate_byte_identically() -> None:
    result = _run("bench/report.py", "--check")
    assert result.returncode == 0, result.stderr + result.stdout


def test_tables_are_rendered_from_the_json_files(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(BENCH / "results", results)
    bundled = json.loads((results / "bundled_models.json").read_text())
    bundled["rows"]["default"]["Set5"]["psnr"] = 30.1234
    (results / "bundled_models.json").write_text(json.dumps(bundled))
    methods = json.loads((results / "methods_x4.json").read_text())
    methods["rows"][2]["Set5"]["psnr"] = 12.3456
    (results / "methods_x4.json").write_text(json.dumps(methods))
    out = tmp_path / "results.md"
    result = _run("bench/report.py", "--results", str(results), "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    committed = (REPO / "docs" / "results.md").read_text()
    assert "| `default` (RBD W4A4) | 4250 + 350 it | 30.123 / 0.8876 |" in text
    assert "30.123" not in committed and "| 12.35 |" in text
    restored = text.replace("30.1234", "31.7089").replace("30.123", "31.709").replace("| 12.35 |", "| 30.23 |")
    assert restored == committed  # nothing else changed: every other number is rendered from the same files


def _prose(markdown: str) -> str:
    """README text without fenced code, inline code, links' targets and the generated block."""
    markdown = re.sub(r"<!-- generated: headline -->.*?<!-- end generated -->", "", markdown, flags=re.S)
    markdown = re.sub(r"```.*?```", "", markdown, flags=re.S)
    markdown = re.sub(r"`[^`]*`", "", markdown)
    return re.sub(r"\]\([^)]*\)", "]", markdown)


def test_readme_is_a_front_page_whose_numbers_come_from_json() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for needed in ("quantsr upscale quantsr_cli/assets/example_lr.png", 'python -m pytest -m "not slow"',
                   "## Safety", "docs/results.md", "docs/methods.md"):
        assert needed in readme, needed
    for command in ("upscale", "eval", "quantize", "slim", "distill", "pack", "info", "diffusion"):
        assert re.search(rf"^\| `{command}` \|.*\| `quantsr {command} ", readme, re.M), command  # one example each
    for target in re.findall(r"\]\(([^)#]+)", readme):
        assert (REPO / target).exists(), target
    # measured numbers appear only inside the block bench/report.py generates from bench/results/*.json
    assert re.findall(r"\d+\.\d+", _prose(readme)) == []
    block = readme.split("<!-- generated: headline -->")[1].split("<!-- end generated -->")[0]
    bundled = json.loads((BENCH / "results" / "bundled_models.json").read_text())
    assert f"{bundled['rows']['default']['Set5']['psnr']:.2f}" in block
    assert f"{bundled['rows']['default-w2']['file_bytes']:,}" in block


def test_every_results_file_names_its_code_version() -> None:
    report = _bench_module("report")
    for name in report.PRODUCERS:
        data = json.loads((BENCH / "results" / f"{name}.json").read_text())
        records = data["runs"] if name == "cpu_inference" else [data]
        for record in records:
            version = record.get("code_version", (record.get("settings") or {}).get("code_version",
                                                                                    record.get("version", "missing")))
            assert version != "missing", name  # None = measured before versions were recorded: says so
            if version is None:
                assert "transcribed" in record.get("source", ""), name
    for row in (BENCH / "results" / "methods_rows").glob("*.json"):
        assert set(json.loads(row.read_text())["code_version"]) >= {"git", "package"}, row


def test_compare_methods_rows_are_keyed_on_the_code_version(tmp_path: Path) -> None:
    cm = _bench_module("compare_methods")
    info = _bench_module("benchinfo")
    args = argparse.Namespace(rows_dir=tmp_path, report_only=False, any_version=False, missing=[], versions={},
                              threads=1)
    calls = []

    def compute() -> dict[str, int]:
        calls.append(1)
        return {"value": len(calls)}

    assert cm.measured(args, "row", {"iters": 1}, compute) == {"value": 1}
    saved = json.loads((tmp_path / "row.json").read_text())
    assert saved["code_version"] == info.code_version() and saved["machine"]["cores"] >= 1
    assert cm.measured(args, "row", {"iters": 1}, compute) == {"value": 1} and len(calls) == 1  # reused
    saved["code_version"] = {"git": "0000000", "package": "0.0.0"}
    (tmp_path / "row.json").write_text(json.dumps(saved))
    args.any_version = True
    assert cm.measured(args, "row", {"iters": 1}, compute) == {"value": 1} and len(calls) == 1
    assert args.versions["row"] == "0.0.0+0000000"
    args.any_version = False
    assert cm.measured(args, "row", {"iters": 1}, compute) == {"value": 2}  # another version: measured again
    assert json.loads((tmp_path / "row.json").read_text())["code_version"] == info.code_version()


def test_finished_runs_of_other_code_are_moved_aside(tmp_path: Path) -> None:
    cm = _bench_module("compare_methods")
    args = argparse.Namespace(any_version=False)
    run = tmp_path / "run"
    cm.claim_run_dir(args, run)
    (run / "summary.json").write_text("{}")
    cm.claim_run_dir(args, run)  # same code: kept
    assert (run / "summary.json").is_file()
    (run / "bench_code_version.json").write_text(json.dumps({"git": "0000000", "package": "0.0.0"}))
    cm.claim_run_dir(args, run)
    assert not (run / "summary.json").exists() and (tmp_path / "run.stale" / "summary.json").is_file()


@pytest.mark.parametrize("arch", ["quantsr-c"])
def test_cpu_inference_appends_a_versioned_run(tmp_path: Path, arch: str) -> None:
    out = tmp_path / "cpu.json"
    args = ["bench/cpu_inference.py", "--arch", arch, "--num-block", "1", "--size", "16", "--repeat", "1",
            "--warmup", "0", "--threads", "1", "--out", str(out)]
    for _ in range(2):
        result = _run(*args)
        assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 and runs[0]["code_version"]["git"] and runs[0]["machine"]["threads"] == 1
    assert runs[0]["seconds"]["cpu"] > 0 and runs[0]["speedup_vs_fp32"] > 0
    tables = _bench_module("report_tables")
    assert any("quantsr-c 1 blocks" in line for line in tables.cpu_inference({"runs": runs}))
