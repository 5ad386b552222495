"""Untrusted files cannot run code or choose where we write.

Static: the package source never unpickles without ``weights_only=True``, reads YAML only with
``safe_load``, and never calls ``eval``/``exec``/``compile`` (checked on the syntax tree, so multi-line
calls and aliases are seen; a self-test proves the checker catches each pattern).
Dynamic: metadata values that look like paths or try to escape the run folder are never written to.
"""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from quantsr_cli.packing import io as packing_io

from .forkcli import REPO
from .helpers import error_line, fresh_dir, tree, write_png

PACKAGE = REPO / "quantsr_cli"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
PICKLE_EXCEPTIONS = {"UnpicklingError", "PickleError"}
YAML_SAFE = {"safe_load", "safe_load_all", "YAMLError", "safe_dump", "safe_dump_all", "dump", "MarkedYAMLError",
             "compose", "MappingNode", "ScalarNode", "SequenceNode"}  # compose builds the node tree only


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every unsafe deserialisation or dynamic-code construct in ``source`` (``file:line: what``)."""
    tree_ = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> module (or module.attr) it stands for
    found: list[str] = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree_):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                root = node.module.split(".")[0]
                if root in UNSAFE_MODULES and a.name not in PICKLE_EXCEPTIONS:
                    report(node, f"from {node.module} import {a.name}")
                if root == "yaml" and a.name not in YAML_SAFE:
                    report(node, f"from yaml import {a.name}")
                if node.module == "torch" and a.name == "load":
                    report(node, "from torch import load (call torch.load(..., weights_only=True))")

    def resolve(node: ast.AST) -> str:
        name = _dotted(node)
        head, _, rest = name.partition(".")
        if head in aliases:
            return aliases[head] + (f".{rest}" if rest else "")
        return name

    for node in ast.walk(tree_):
        if isinstance(node, ast.Attribute):
            full = resolve(node)
            root, _, attr = full.partition(".")
            if root in UNSAFE_MODULES and attr and attr.split(".")[0] not in PICKLE_EXCEPTIONS:
                report(node, full)
            if root == "yaml" and attr and attr.split(".")[0] not in YAML_SAFE:
                report(node, full)
        if not isinstance(node, ast.Call):
            continue
        func = resolve(node.func)
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        if func in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"):
            report(node, f"{func}(...)")
        if func in ("torch.load", "torch.serialization.load"):
            flag = kwargs.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                report(node, "torch.load without weights_only=True")
        if func in ("numpy.load", "np.load") and isinstance(kwargs.get("allow_pickle"), ast.Constant) \
                and kwargs["allow_pickle"].value is not False:
            report(node, "numpy.load(allow_pickle=True)")
        if func in ("torch.jit.load", "torch.package.PackageImporter", "os.system", "os.popen"):
            report(node, f"{func}(...)")
        if isinstance(kwargs.get("shell"), ast.Constant) and kwargs["shell"].value is True:
            report(node, "shell=True")
    return found


def test_checker_catches_every_pattern() -> None:
    bad = '''
import pickle, yaml, torch, numpy as np
import pickle as p2
from yaml import load as yl
from torch import load
a = pickle.load(f); b = p2.loads(s); c = yaml.load(t, Loader=yaml.Loader); d = yaml.unsafe_load(t)
e = torch.load(path)
f = torch.load(
    path, map_location="cpu", weights_only=False)
g = eval("1"); h = exec("x = 1"); i = compile("1", "s", "eval"); j = np.load(p, allow_pickle=True)
k = __import__("os"); m = torch.jit.load(p)
'''
    found = unsafe_calls(bad)
    for what in ("pickle.load", "pickle.loads", "yaml.load", "yaml.Loader", "yaml.unsafe_load", "from yaml import load",
                 "from torch import load", "eval(", "exec(", "compile(", "allow_pickle", "__import__",
                 "torch.jit.load"):
        assert any(what in f for f in found), (what, found)
    assert sum("without weights_only" in f for f in found) == 2
    good = '''
import pickle, yaml, torch
try:
    sd = torch.load(path, map_location="cpu",
                    weights_only=True)
except pickle.UnpicklingError:
    pass
cfg = yaml.safe_load(text)
model.eval()
'''
    assert unsafe_calls(good) == []


def test_package_source_has_no_unsafe_loading_or_dynamic_code() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30
    found = [hit for f in files for hit in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))]
    assert found == [], "\n".join(found)
    # and the plain-text view of the same rules (what a reviewer would grep for)
    for f in files:
        text = f.read_text(encoding="utf-8")
        for pattern in ("yaml.load(", "yaml.unsafe_load", "pickle.load", "allow_pickle=True", "Loader=yaml.Loader"):
            assert pattern not in text, f"{f}: {pattern}"


def _with_metadata(src: Path, dst: Path, **changes: str) -> Path:
    """A copy of ``src`` with metadata values replaced (the data checksum stays valid)."""
    tensors, meta = packing_io.read_file(src)
    meta.update(changes)
    packing_io.save_file(tensors, meta, dst)
    return dst


def test_metadata_cannot_choose_the_run_folder(cli, tiny_models, small_train_dir, tmp_path: Path) -> None:
    """slim/distill take arch and scale from the --model file and name the run folder after them."""
    work = fresh_dir(tmp_path / "work")
    escape = tmp_path / "escaped"
    evil = _with_metadata(tiny_models["student4"], tmp_path / "evil.safetensors",
                          arch=f"../../{escape.name}/x", extra=json.dumps({"out": str(escape / "pwn.png")}))
    result = cli("slim", "--model", str(evil), "--target-blocks", "2", "--iters", "1", "--batch-size", "1",
                 "--patch-size", "32", "--train-data", str(small_train_dir), cwd=work)
    error_line(result, str(evil), "metadata")
    bad_scale = _with_metadata(tiny_models["student"], tmp_path / "scale.safetensors", scale="../../x")
    result = cli("distill", "--model", str(bad_scale), "--teacher", str(tiny_models["teacher"]), "--iters", "1",
                 "--batch-size", "1", "--patch-size", "32", "--train-data", str(small_train_dir), cwd=work)
    error_line(result, str(bad_scale))
    assert list(work.iterdir()) == [] and not escape.exists()


def test_paths_in_metadata_are_never_written(cli, tiny_models, tmp_path: Path) -> None:
    decoy = tmp_path / "decoy"
    extra = json.dumps({"out": str(decoy / "a.png"), "run_dir": str(decoy), "command": f"quantsr pack -o {decoy}/b"})
    packed = _with_metadata(tiny_models["packed"], tmp_path / "packed.safetensors", extra=extra)
    qat = _with_metadata(tiny_models["qat"], tmp_path / "qat.safetensors", extra=extra)
    work = fresh_dir(tmp_path / "work")
    src = write_png(work / "in.png", np.zeros((8, 8, 3), np.uint8))
    up = cli("upscale", str(src), "-o", str(work / "out"), "--model", str(packed), cwd=work)
    assert up.returncode == 0, up.stderr[-2000:]
    pk = cli("pack", str(qat), "-o", str(work / "p.safetensors"), cwd=work)
    assert pk.returncode == 0, pk.stderr[-2000:]
    assert sorted(tree(work)) == ["in.png", "out/in.png", "p.safetensors"]
    assert not decoy.exists()


@pytest.mark.parametrize("value", ["../../x", "/etc/passwd", "quantsr-c/../../x"])
def test_hostile_arch_metadata_is_a_checkpoint_error(tiny_models, tmp_path: Path, value: str) -> None:
    from quantsr_cli.engine.modelio import load_model
    from quantsr_cli.errors import CheckpointError

    path = _with_metadata(tiny_models["packed"], tmp_path / "m.safetensors", arch=value)
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert value in json.loads(raw[8 : 8 + n])["__metadata__"]["arch"]
