"""The registries are the only lists: methods, architectures and backends are named nowhere else."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest
import torch

from quantsr_cli.backends import AUTO, BACKENDS, Backend, auto_backend, backend_choices
from quantsr_cli.config import QuantConfig
from quantsr_cli.models import ARCHS, arch_names, build_model, detect_arch, probe_model
from quantsr_cli.quant import METHODS
from quantsr_cli.quant.base import ActQuantizer, WeightQuantizer

PACKAGE = Path(__file__).resolve().parents[1] / "quantsr_cli"

METHOD_FILES = {"quant/act.py", "quant/weight.py", "quant/methods.py"}
"""Where the built-in methods are defined and registered."""

ALLOWED = {
    "config.py": "QuantConfig's default method (checked against the registry below)",
    "diffusion/": "QArtSR's own quantizer family, outside the method registry (issue #21, diffusion part)",
    "backends/engine_plans.py": "the cupy engine's fused plans, written for IMDN and QuantSR-C layouts",
}


def _literals(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _named_outside(names: set[str], owners: set[str]) -> dict[str, set[str]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in owners or any(rel == a or (a.endswith("/") and rel.startswith(a)) for a in ALLOWED):
            continue
        hits = _literals(path) & names
        if hits:
            found[rel] = hits
    return found


def test_no_module_outside_the_method_files_names_a_method() -> None:
    assert _named_outside(set(METHODS), METHOD_FILES) == {}


def test_no_module_outside_an_arch_file_names_an_arch() -> None:
    owners = {f"models/{spec.builder.__module__.rsplit('.', 1)[-1]}.py" for spec in ARCHS.values()}
    assert _named_outside(set(ARCHS), owners) == {}


def test_method_specs_are_consistent() -> None:
    assert QuantConfig().method == next(iter(METHODS))  # the default is the registry's first method
    for name, spec in METHODS.items():
        assert spec.name == name and issubclass(spec.act, ActQuantizer) and issubclass(spec.weight, WeightQuantizer)
        overrides = (spec.act.load_packed is not ActQuantizer.load_packed,
                     spec.weight.load_packed is not WeightQuantizer.load_packed)
        assert overrides == (spec.fine_tunable, spec.fine_tunable), name  # fine-tunable <=> rebuildable quantizers
        assert spec.make_act(32) is None and spec.make_weight(32) is None
        assert spec.make_act(4, (1, 8, 1, 1)).bits == 4 and spec.make_weight(2).bits == 2


@pytest.mark.parametrize("arch", sorted(arch_names("sr")))
def test_arch_specs_detect_their_own_weights_and_only_those(arch: str) -> None:
    spec = ARCHS[arch]
    model = build_model(arch, upscale=3)
    assert spec.detect(model.state_dict()) is not None and detect_arch(model.state_dict())[0] == arch
    for other in ARCHS.values():
        if other is not spec and not other.fallback:  # a fallback family (spandrel's) knows many layouts
            assert other.detect(model.state_dict()) is None, (other.name, arch)
    names = {n for n, _ in model.named_modules()}
    assert all(any(fnmatch.fnmatchcase(n, p) for n in names) for p in model.quant_patterns)
    if spec.depth is not None:
        n = spec.block_count(model.hparams)
        assert n == len(model.block_names())
        deeper = probe_model(arch, **{**model.hparams, **spec.with_blocks(n + 2)})
        assert len(deeper.block_names()) == n + 2
        kept = probe_model(arch, **spec.keep_blocks(model.hparams, [0, n - 1]))
        assert len(kept.block_names()) == 2


def test_backend_table() -> None:
    assert backend_choices() == [AUTO, *BACKENDS]
    for spec in BACKENDS.values():
        if spec.unavailable_reason() is None:
            assert isinstance(spec.load(), Backend)
    if not torch.cuda.is_available():  # the CPU runtimes when installed (cpu-fast extra), else cpu
        assert auto_backend() == ("openvino" if BACKENDS["openvino"].unavailable_reason() is None else "cpu")
    assert auto_backend(after="openvino") == "cpu" or torch.cuda.is_available()
