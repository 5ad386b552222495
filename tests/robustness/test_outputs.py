"""No command writes onto one of its own inputs or writes two results to one path.

Every output path of a run is resolved (symlinks followed, ``--suffix``/``--ext`` applied) before anything
is written; a target equal to any input of the run, two targets that coincide, an output inside a
dataset folder, or an output name that cannot be what the user meant, is one ``error:`` line (exit 1)
and leaves every file as it was.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from .helpers import QUICK_TRAIN, error_line, fresh_dir, tree, write_png

RNG = np.random.default_rng(11)


def _img(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((12, 16, 3)) * 255).astype(np.uint8)


def test_folder_into_itself_with_suffix_never_replaces_another_input(cli, tiny_models, tmp_path: Path) -> None:
    folder = fresh_dir(tmp_path / "in")
    write_png(folder / "a.png", _img(1))
    write_png(folder / "a_x.png", _img(2))  # a.png + "_x" would land here
    before = tree(folder)
    result = cli("upscale", str(folder), "-o", str(folder), "--suffix", "_x", "--model", str(tiny_models["packed"]))
    error_line(result, "a_x.png")
    assert tree(folder) == before


def test_folder_into_itself_without_suffix_is_one_refusal(cli, tiny_models, tmp_path: Path) -> None:
    folder = fresh_dir(tmp_path / "in")
    write_png(folder / "a.png", _img(1))
    write_png(folder / "b.png", _img(2))
    before = tree(folder)
    error_line(cli("upscale", str(folder), "-o", str(folder), "--model", str(tiny_models["packed"])), "a.png")
    assert tree(folder) == before


def test_names_that_collide_after_ext_are_refused_before_any_work(cli, tiny_models, tmp_path: Path) -> None:
    folder = fresh_dir(tmp_path / "in")
    write_png(folder / "a.jpg", _img(1))
    write_png(folder / "a.png", _img(2))
    before = tree(folder)
    out = tmp_path / "out"
    model = str(tiny_models["packed"])
    error_line(cli("upscale", str(folder), "-o", str(out), "--ext", "png", "--model", model), "a.png")
    assert not out.exists()
    # into the input folder itself: a.jpg -> a.png would replace the other input
    error_line(cli("upscale", str(folder / "a.jpg"), str(folder / "a.png"), "-o", str(folder), "--ext", "png",
                   "--suffix", "", "--model", model), "a.png")
    assert tree(folder) == before
    # same name in two input folders
    other = fresh_dir(tmp_path / "other")
    write_png(other / "a.png", _img(3))
    error_line(cli("upscale", str(folder / "a.png"), str(other / "a.png"), "-o", str(out), "--model", model), "a.png")
    assert not out.exists()


def test_outputs_that_resolve_to_an_input_are_refused(cli, tiny_models, tmp_path: Path) -> None:
    src = write_png(tmp_path / "a.png", _img(1))
    before = src.read_bytes()
    model_copy = tmp_path / "m.safetensors"
    shutil.copy(tiny_models["packed"], model_copy)
    link = tmp_path / "link.png"
    link.symlink_to(src)
    error_line(cli("upscale", str(src), "-o", str(link), "--model", str(model_copy)), str(link))
    hard = tmp_path / "hard.png"
    os.link(src, hard)
    error_line(cli("upscale", str(src), "-o", str(hard), "--model", str(model_copy)), str(hard))
    assert src.read_bytes() == before and hard.read_bytes() == before
    # the model file is an input of the run too
    linked_model = tmp_path / "model_out.png"
    linked_model.symlink_to(model_copy)
    error_line(cli("upscale", str(src), "-o", str(linked_model), "--model", str(model_copy)), str(linked_model))
    assert model_copy.read_bytes() == tiny_models["packed"].read_bytes()


def test_output_names_that_cannot_be_meant_create_nothing(cli, tiny_models, tmp_path: Path) -> None:
    a = write_png(tmp_path / "a.png", _img(1))
    b = write_png(tmp_path / "b.png", _img(2))
    model = str(tiny_models["packed"])
    error_line(cli("upscale", str(a), str(b), "-o", str(tmp_path / "single.png"), "--model", model), "single.png")
    error_line(cli("upscale", str(a), "-o", str(tmp_path / "out.gif"), "--model", model), "out.gif", "extension")
    error_line(cli("upscale", str(a), str(b), "-o", str(tmp_path / "res.v2"), "--model", model), "res.v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_eval_never_writes_into_a_dataset_folder(cli, tiny_models, tmp_path: Path) -> None:
    ds = fresh_dir(tmp_path / "ds")  # a flat folder of HR images
    write_png(ds / "a.png", np.tile(_img(1), (2, 2, 1)))
    write_png(ds / "b.png", np.tile(_img(2), (2, 2, 1)))
    before = tree(ds)
    env = {"QUANTSR_CACHE": str(tmp_path / "cache")}
    base = ("eval", "--model", str(tiny_models["packed"]), "--dataset", "ds")
    error_line(cli(*base, "--save-dir", ".", cwd=tmp_path, env=env), "ds")  # would replace ds/a.png, ds/b.png
    error_line(cli(*base, "--compare-dir", "ds", cwd=tmp_path, env=env), "ds")
    error_line(cli(*base, "--save-dir", str(ds / "sr"), cwd=tmp_path, env=env), "ds")
    assert tree(ds) == before
    ok = cli(*base, "--save-dir", "sr", cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "sr" / "ds").iterdir()) == ["a.png", "b.png"]
    assert tree(ds) == before


def _copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    return dst


# name -> (builder of (args, the input that --out names), ...)
def _training_cases(models: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], Path]]:
    qat, student, student4 = (_copy(models[k], tmp / f"{k}.safetensors") for k in ("qat", "student", "student4"))
    teacher, fp = _copy(models["teacher"], tmp / "teacher.safetensors"), _copy(models["fp"], tmp / "fp.safetensors")
    return {
        "quantize --model": (["quantize", "--model", str(qat), "-o", str(qat)], qat),
        "quantize --init": (["quantize", "--arch", "quantsr-c", "--scale", "2", "--bits", "4", "--init", str(fp),
                             "--out", str(fp)], fp),
        "quantize --distill": (["quantize", "--model", str(qat), "--distill", str(fp), "-o", str(fp)], fp),
        "slim --model": (["slim", "--model", str(student4), "--target-blocks", "2", "-o", str(student4)], student4),
        "distill --teacher": (["distill", "--model", str(student), "--teacher", str(teacher), "-o", str(teacher)],
                              teacher),
        "distill --model": (["distill", "--model", str(student), "--teacher", str(teacher), "-o", str(student)],
                            student),
    }


@pytest.mark.parametrize("case", ["quantize --model", "quantize --init", "quantize --distill", "slim --model",
                                  "distill --teacher", "distill --model"])
def test_training_output_equal_to_an_input_is_refused(cli, tiny_models, small_train_dir, tmp_path: Path,
                                                     case: str) -> None:
    args, victim = _training_cases(tiny_models, tmp_path)[case]
    before = victim.read_bytes()
    run_dir = tmp_path / "run"
    result = cli(*args, "--run-dir", str(run_dir), "--train-data", str(small_train_dir), *QUICK_TRAIN)
    error_line(result, str(victim))
    assert victim.read_bytes() == before
    assert not run_dir.exists()  # refused before any work


def test_out_cannot_be_another_result_of_the_run(cli, tiny_models, small_train_dir, tmp_path: Path) -> None:
    qat = _copy(tiny_models["qat"], tmp_path / "qat.safetensors")
    run_dir = tmp_path / "run"
    out = run_dir / "qat_last.safetensors"
    result = cli("quantize", "--model", str(qat), "-o", str(out), "--run-dir", str(run_dir),
                 "--train-data", str(small_train_dir), *QUICK_TRAIN)
    error_line(result, str(out))
    assert not run_dir.exists()


def test_diffusion_quantize_output_equal_to_its_model_is_refused(cli, diffusion_models, small_train_dir,
                                                                  tmp_path: Path) -> None:
    model = _copy(diffusion_models["fp"], tmp_path / "osd.safetensors")
    before = model.read_bytes()
    result = cli("diffusion", "quantize", "--model", str(model), "-o", str(model), "--iters", "1", "--stages", "rpq",
                 "--calib-patches", "2", "--batch-size", "1", "--train-data", str(small_train_dir))
    error_line(result, str(model))
    assert model.read_bytes() == before


def test_pack_output_equal_to_its_input_through_a_link_is_refused(cli, tiny_models, tmp_path: Path) -> None:
    qat = _copy(tiny_models["qat"], tmp_path / "qat.safetensors")
    before = qat.read_bytes()
    link = tmp_path / "packed.safetensors"
    link.symlink_to(qat)
    error_line(cli("pack", str(qat), "-o", str(link)), str(link))
    error_line(cli("pack", str(qat), "-o", str(qat)), str(qat))
    assert qat.read_bytes() == before and link.is_symlink()
