"""Write ``docs/results.md`` and README's headline table from ``bench/results/*.json``.

The prose lives in ``docs/results.md.in``; each ``{{name}}`` in it is replaced by what :data:`BLOCKS`
renders from the JSON files (CPU tables: ``bench/report_tables.py``, GPU tables: ``bench/report_gpu.py``).
README.md holds one generated block, between the ``<!-- generated: headline -->`` and
``<!-- end generated -->`` lines. Deterministic: the same JSON files give the same bytes, which a test
checks against the committed files::

    python bench/report.py            # rewrite docs/results.md and README's block
    python bench/report.py --check    # exit 1 when either differs from what the JSON files give
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import report_gpu
import report_peers
import report_tables as t

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- generated: headline -->", "<!-- end generated -->"

# file -> what produced it (the sources table)
PRODUCERS = {
    "bundled_models": "`bench/bundled_models.py`",
    "complexity_x4": "`bench/complexity.py`",
    "methods_x4": "`bench/compare_methods.py` (rows in `methods_rows/`)",
    "ablation_quantsr_plus": "`bench/ablation_quantsr_plus.py`",
    "qartsr_x4": "`bench/qartsr_compare.py`",
    "cpu_inference": "`bench/cpu_inference.py --out` (the first runs transcribed)",
    "cpu_peers": "`bench/cpu_peers.py`",
    "ov_profile": "`bench/ov_profile.py`",
    "ov_headroom": "`bench/ov_headroom.py`",
    "gpu_first_runs": "`bench/gpu_validate.sh` outputs, parsed",
    "bundled_training": "transcribed (run folders not kept)",
    "calibration_imdn_w2a2": "transcribed (run folders not kept)",
    "packed_sizes": "transcribed",
    "memory": "transcribed (`tests/robustness/memory.py` wrapper)",
}


class Results:
    """The JSON files of one results folder, loaded on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cache: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._cache:
            self._cache[name] = json.loads((self.folder / f"{name}.json").read_text(encoding="utf-8"))
        return self._cache[name]

    def has(self, name: str) -> bool:
        return (self.folder / f"{name}.json").is_file()


def gpu(r: Results) -> list[str]:
    lines = report_gpu.first_runs(r["gpu_first_runs"]) + [""]
    if r.has("gpu_inference"):
        return lines + report_gpu.engine_runs(r["gpu_inference"])
    return lines + ["### Engine", "", "Not measured on a GPU yet (`bench/gpu_validate.sh` runs it on the next lent "
                                     "device)."]


def _machine(m: Any) -> str:
    if isinstance(m, dict):
        torch = f", torch {m['torch']}" if m.get("torch") else ""
        return f"{m.get('cpu') or m.get('device')}, {m.get('cores') or m.get('sms', '?')} " \
               f"{'cores' if 'cores' in m else 'SMs'}{torch}"
    return str(m) if m else "not recorded"


def sources(r: Results) -> list[str]:
    rows = []
    for name, producer in PRODUCERS.items():
        d = r[name]
        if name == "cpu_inference":
            v = ", ".join(sorted({t.version(x.get("code_version")) for x in d["runs"]}))
            m = "; ".join(sorted({_machine(x["machine"]) for x in d["runs"]}))
        else:
            cv = d.get("code_version", (d.get("settings") or {}).get("code_version", d.get("version")))
            v = cv if isinstance(cv, str) else t.version(cv)
            m = _machine(d.get("machine"))
        rows.append([f"`{name}.json`", producer, v, m])
    return t.table(["file", "written by", "code version", "machine"], rows)


def readme_block(r: Results) -> list[str]:
    b, p = r["bundled_models"], r["cpu_peers"]
    return t.headline(b) + ["", f"Set5 with the `cpu` backend vs the `torch` reference: {t.cpu_backend_psnr(b)[0]}.",
                            f"Speed on one CPU thread ({p['machine'].get('cpu')}, `bench/results/cpu_peers.json`; "
                            "fastest quantsr backend in bold):", ""] + report_peers.headline(p)


BLOCKS: dict[str, Callable[[Results], list[str]]] = {
    "headline": readme_block,
    "eval_reference": lambda r: t.eval_reference(r["bundled_models"]),
    "complexity": lambda r: t.complexity(r["complexity_x4"]),
    "swinir_matmuls": lambda r: [t.swinir_matmuls(r["complexity_x4"])],
    "bundled": lambda r: t.bundled(r["bundled_models"], r["bundled_training"]),
    "history": lambda r: t.history(r["bundled_training"]),
    "calibration": lambda r: t.calibration(r["calibration_imdn_w2a2"]),
    "methods": lambda r: t.methods(r["methods_x4"]),
    "dqa": lambda r: t.dqa(r["methods_x4"]),
    "ablation": lambda r: t.ablation(r["ablation_quantsr_plus"]),
    "packed_sizes": lambda r: t.packed_sizes(r["packed_sizes"], r["bundled_models"]),
    "cpu_inference": lambda r: t.cpu_inference(r["cpu_inference"]),
    "cpu_backend_psnr": lambda r: t.cpu_backend_psnr(r["bundled_models"]),
    "cpu_peers_t1": lambda r: report_peers.peers(r["cpu_peers"], 1),
    "cpu_peers_t2": lambda r: report_peers.peers(r["cpu_peers"], 2),
    "cpu_peers_settings": lambda r: report_peers.settings(r["cpu_peers"]),
    "cpu_peers_ratio": lambda r: [report_peers.ratio_line(r["cpu_peers"])],
    "cpu_peers_profile": lambda r: report_peers.profile(r["ov_profile"]),
    "ov_headroom": lambda r: report_peers.headroom(r["ov_headroom"]),
    "memory": lambda r: t.memory(r["memory"]),
    "gpu": gpu,
    "qartsr": lambda r: t.qartsr(r["qartsr_x4"]),
    "qartsr_sweep": lambda r: t.qartsr_sweep(r["qartsr_x4"]),
    "sources": sources,
}


def fill(template: str, r: Results) -> str:
    """``template`` with every ``{{name}}`` replaced by its rendered block (an unknown name is an error)."""

    def block(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in BLOCKS:
            raise SystemExit(f"docs/results.md.in: unknown block {{{{{name}}}}}; known: {', '.join(BLOCKS)}")
        return "\n".join(BLOCKS[name](r))

    return re.sub(r"\{\{(\w+)\}\}", block, template)


def with_readme_block(readme: str, r: Results) -> str:
    """README text with its generated block replaced."""
    if readme.count(START) != 1 or readme.count(END) != 1:
        raise SystemExit(f"README.md must hold one {START} ... {END} block")
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    return head + START + "\n" + "\n".join(readme_block(r)) + "\n" + END + tail


def render(results: Path, root: Path = ROOT) -> dict[Path, str]:
    """The generated files (path -> text) for the results in ``results``."""
    r = Results(results)
    template = (root / "docs" / "results.md.in").read_text(encoding="utf-8")
    readme = (root / "README.md").read_text(encoding="utf-8")
    return {root / "docs" / "results.md": fill(template, r), root / "README.md": with_readme_block(readme, r)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is out of date")
    parser.add_argument("--out", type=Path, default=None, help="write docs/results.md here instead (README untouched)")
    args = parser.parse_args()
    outputs = render(args.results)
    if args.out is not None:
        args.out.write_text(outputs[ROOT / "docs" / "results.md"], encoding="utf-8")
        return
    stale = [p for p, text in outputs.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    if args.check:
        if stale:
            sys.exit("out of date (run python bench/report.py): " + ", ".join(str(p.relative_to(ROOT)) for p in stale))
        return
    for path in stale:
        path.write_text(outputs[path], encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
