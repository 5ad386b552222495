"""Fuzzing the model and checkpoint loaders the commands use: only QuantSRError subclasses come out.

tests/test_packing.py fuzzes the low-level safetensors reader (random bytes, byte flips, hostile
metadata of a packed file). Here: the layers above it that the CLI calls -- ``load_model`` (eval,
upscale, distill teachers), ``model_info`` (info), ``pack_file`` (pack), training-state resume -- on
files whose checksum is *valid* (so parsing gets past it) but whose metadata or tensors are hostile,
for every kind (fp, qat, packed); and the ``.pth`` reader on random and mutated pickles.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantsr_cli.engine import checkpoint as ckpt
from quantsr_cli.engine.modelio import load_model
from quantsr_cli.engine.report import model_info, pack_file
from quantsr_cli.errors import QuantSRError
from quantsr_cli.models import build_model
from quantsr_cli.models.loading import read_state_dict
from quantsr_cli.packing import io as packing_io

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=True)
    | st.sampled_from(["quantsr-c", "imdn", "rbd", "packed", "qat", "fp", "2", "4", "32", "../../x", ""])
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
DTYPES = [torch.float32, torch.float16, torch.float64, torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool]


def only_our_errors(fn, *args: object, **kwargs: object) -> None:
    try:
        fn(*args, **kwargs)
    except QuantSRError:
        pass


class Files(dict):
    """The decoded fp/qat/packed files (short repr: hypothesis prints fixtures of a failing example)."""

    def __repr__(self) -> str:
        return f"<decoded model files {sorted(self)}>"


@pytest.fixture(scope="module")
def originals(tiny_models) -> Files:
    return Files({kind: packing_io.read_file(tiny_models[kind]) for kind in ("fp", "qat", "packed")})


def _mutate(data: st.DataObject, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """One hostile edit of a file's content that still serialises (and so keeps a valid checksum)."""
    what = data.draw(st.sampled_from(["meta_json", "meta_text", "meta_drop", "drop", "dtype", "shape", "values",
                                      "add"] + (["hparams"] if "hparams" in meta else [])))
    if what.startswith("meta"):
        key = data.draw(st.sampled_from(sorted(meta)))
        if what == "meta_drop":
            meta.pop(key)
        else:
            meta[key] = json.dumps(data.draw(JSON)) if what == "meta_json" else data.draw(st.text(max_size=30))
    elif what == "hparams":  # a plausible builder argument with a hostile value
        try:
            hp = dict(json.loads(meta["hparams"]))
        except (ValueError, TypeError):
            hp = {}  # an earlier edit already broke it
        hp[data.draw(st.sampled_from(sorted(hp) + ["num_block", "window_size", "depths", "bogus"]))] = data.draw(JSON)
        meta["hparams"] = json.dumps(hp)
    else:
        key = data.draw(st.sampled_from(sorted(tensors)))
        t = tensors[key]
        if what == "drop":
            del tensors[key]
        elif what == "dtype":
            tensors[key] = t.to(data.draw(st.sampled_from(DTYPES)))
        elif what == "shape":
            n = data.draw(st.integers(0, t.numel()))
            tensors[key] = t.flatten()[:n].clone().reshape(data.draw(st.sampled_from([(n,), (1, n), (n, 1)])))
        elif what == "values":
            fill = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e38, -1.0, 0.0, 255.0]))
            # via float32: 1e38 in a float16 tensor becomes inf (torch.full_like refuses the overflow)
            tensors[key] = torch.full_like(t, fill, dtype=torch.float32).to(t.dtype) if t.is_floating_point() else torch.full_like(t, 255 if t.dtype == torch.uint8 else -1)
        else:
            tensors[data.draw(st.sampled_from([f"{key}.x", "body.9.conv1.weight", "upsample.7.qweight"]))] = torch.zeros(
                data.draw(st.lists(st.integers(0, 3), max_size=3)))


@FUZZ
@given(data=st.data())
def test_fuzz_commands_loaders_on_hostile_content(originals, tmp_path: Path, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(sorted(originals)))
    tensors, meta = dict(originals[kind][0]), dict(originals[kind][1])
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(data, tensors, meta)
    path = tmp_path / "fuzz.safetensors"
    try:
        packing_io.save_file(tensors, meta, path)
    except (TypeError, ValueError):
        return  # e.g. a format/version our writer refuses to produce
    only_our_errors(load_model, str(path))
    only_our_errors(model_info, str(path))
    only_our_errors(pack_file, str(path), tmp_path / "packed_out.safetensors")


@FUZZ
@pytest.mark.filterwarnings("ignore::UserWarning")
@given(blob=st.binary(max_size=400), valid_header=st.booleans())
def test_fuzz_commands_loaders_on_random_bytes(tmp_path: Path, blob: bytes, valid_header: bool) -> None:
    if valid_header:  # a real quantsr header in front, random data after it
        head = json.dumps({"__metadata__": {"format": "quantsr", "format_version": "1", "kind": "fp",
                                            "arch": "quantsr-c", "hparams": "{}", "scale": "4"}}).encode()
        blob = struct.pack("<Q", len(head)) + head + blob
    for suffix in (".safetensors", ".pth"):
        path = tmp_path / f"fuzz{suffix}"
        path.write_bytes(blob)
        only_our_errors(load_model, str(path))
        only_our_errors(model_info, str(path))


@pytest.fixture(scope="module")
def pth_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pth") / "valid.pth"
    torch.save({"params": build_model("quantsr-c", upscale=2, num_block=1, num_feat=8).state_dict()}, path)
    return path


@FUZZ
@pytest.mark.filterwarnings("ignore::UserWarning")
@given(data=st.data())
def test_fuzz_pth_reader(pth_file: Path, tmp_path: Path, data: st.DataObject) -> None:
    pth_bytes = pth_file.read_bytes()
    mode = data.draw(st.sampled_from(["flip", "truncate", "member", "container"]))
    path = tmp_path / "fuzz.pth"
    if mode == "flip":
        raw = bytearray(pth_bytes)
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        path.write_bytes(bytes(raw))
    elif mode == "truncate":
        path.write_bytes(pth_bytes[: data.draw(st.integers(0, len(pth_bytes) - 1))])
    elif mode == "member":  # rewrite the pickle inside the zip with random bytes
        src = zipfile.ZipFile(io.BytesIO(pth_bytes))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                body = src.read(info)
                if info.filename.endswith("data.pkl"):
                    body = data.draw(st.binary(max_size=200)) if data.draw(st.booleans()) else body[: len(body) // 2]
                dst.writestr(info, body)
        path.write_bytes(out.getvalue())
    else:  # a well-formed file holding odd containers instead of a state dict
        leaf = st.sampled_from([torch.zeros(0), torch.zeros(2, 3), torch.ones(1, dtype=torch.uint8), 1, "x", None])
        obj = data.draw(st.recursive(leaf, lambda inner: st.lists(inner, max_size=3)
                                     | st.dictionaries(st.sampled_from(["params", "params_ema", "state_dict", "model",
                                                                        "conv_first.weight", "body.0.conv1.weight"]),
                                                       inner, max_size=3), max_leaves=8))
        torch.save(obj, path)
    only_our_errors(read_state_dict, path)
    only_our_errors(load_model, str(path))
    only_our_errors(load_model, str(path), arch="quantsr-c", scale=2)


@pytest.fixture(scope="module")
def state_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model("quantsr-c", upscale=2, num_block=1, num_feat=8)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.rand(1, 3, 8, 8)).mean().backward()
    optimizer.step()
    run = tmp_path_factory.mktemp("state")
    return ckpt.save_state(run, 3, model, optimizer, {"best_psnr": None, "hooks": []}, {"arch": "quantsr-c"})


@FUZZ
@given(data=st.data())
def test_fuzz_training_state_resume(state_file: Path, tmp_path: Path, data: st.DataObject) -> None:
    tensors, meta = packing_io.read_file(state_file)
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):
            _mutate(data, tensors, meta)
        else:  # the keys resume reads, with hostile values
            key = data.draw(st.sampled_from(["optimizer", "trainer", "iteration", "kind"]))
            meta[key] = json.dumps(data.draw(JSON)) if data.draw(st.booleans()) else data.draw(st.text(max_size=10))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    for old in (run / "checkpoints").iterdir():
        old.unlink()
    try:
        packing_io.save_file(tensors, meta, run / "checkpoints" / state_file.name)
    except (TypeError, ValueError):
        return
    model = build_model("quantsr-c", upscale=2, num_block=1, num_feat=8)
    optimizer = torch.optim.Adam(model.parameters())
    rng = torch.get_rng_state()
    try:
        found = ckpt.load_latest_state(run)
        if found is not None:
            path, t, m = found
            iteration, trainer_state = ckpt.restore_state(t, m, model, optimizer, path)
            assert isinstance(iteration, int) and isinstance(trainer_state, dict)
    except QuantSRError:
        pass
    finally:
        torch.set_rng_state(rng)
