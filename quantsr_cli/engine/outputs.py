"""Output-path safety, shared by every command that writes: nothing a user owns is ever overwritten.

A command lists *all* the files (and folders) it will write and *all* its inputs before it writes
anything, and calls :func:`check_outputs`. Paths are compared resolved (symlinks followed, ``..``
removed) and, when both exist, as the same file on disk (hard links), so a run is refused, with one
:class:`~quantsr_cli.errors.ConfigError` naming the output, when

- an output is one of the run's inputs (any of them: ``--model``, ``--teacher``, ``--init``, an image...),
- two outputs of the run are the same path (``a.jpg`` and ``a.png`` with ``--ext png``),
- an output lies inside a protected folder (a dataset being evaluated), or
- an output that must be a file is an existing folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from quantsr_cli.errors import ConfigError
from quantsr_cli.fileio import remove_stale_temp_files

__all__ = ["resolved", "same_file", "check_outputs", "check_run_dir", "clean_temp_files"]

Labelled = Iterable[tuple[str | Path, str]]
"""``(path, label)`` pairs; the label says what the path is, e.g. ``"--model"`` or ``"output"``."""


def resolved(path: str | Path) -> Path:
    """``path`` made absolute with symlinks and ``..`` resolved (the parts that exist)."""
    try:
        return Path(path).expanduser().resolve(strict=False)
    except (OSError, RuntimeError):  # symlink loops
        return Path(os.path.abspath(Path(path).expanduser()))


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when ``a`` and ``b`` name the same file: equal resolved paths, or one inode (hard links)."""
    if resolved(a) == resolved(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_outputs(outputs: Labelled, inputs: Labelled = (), protected: Labelled = (), files: bool = True) -> None:
    """Refuse the run before any work if an output would replace an input or another output.

    Args:
        outputs: every path the run will write, with a label (``"--out"``, ``"output"``...).
        inputs: every file the run reads (models, images, config files), with a label.
        protected: folders no output may be written into (datasets), with a label.
        files: the outputs are files (an existing folder at an output path is an error).

    Raises:
        ConfigError: naming the offending output path.
    """
    ins = [(Path(p), label) for p, label in inputs]
    folders = [(resolved(p), Path(p), label) for p, label in protected]
    seen: dict[Path, tuple[Path, str]] = {}
    for raw, label in outputs:
        out = Path(raw)
        key = resolved(out)
        for src, src_label in ins:
            if same_file(out, src):
                raise ConfigError(f"{label} equals the input {src_label} {src} and would overwrite it; "
                                  "choose another output", out)
        if key in seen:
            first, first_label = seen[key]
            what = f"{first_label} {first}" if first_label != label or first != out else f"{first_label}"
            raise ConfigError(f"two results of this run would be written to this path ({what} and {label}); "
                              "choose another output, --suffix or --ext", out)
        seen[key] = (out, label)
        for folder, shown, folder_label in folders:
            if _inside(key, folder):
                raise ConfigError(f"{label} is inside the {folder_label} {shown}; outputs never go into it", out)
        if files and out.is_dir():
            raise ConfigError(f"{label} is a folder; name a file", out)


def check_run_dir(run_dir: Path) -> None:
    """ConfigError unless ``run_dir`` is a folder or does not exist yet (checked before any data is read)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("--run-dir exists and is not a folder; choose another --run-dir", run_dir)


def clean_temp_files(*folders: str | Path) -> None:
    """Remove the temporary files that killed writers left in these folders (see :mod:`quantsr_cli.fileio`)."""
    for folder in folders:
        remove_stale_temp_files(folder)


MODEL_SUFFIXES = (".safetensors", ".st")


def check_model_output(path: Path, label: str) -> None:
    """ConfigError unless ``path`` can be a model file quantsr writes (a ``.safetensors`` name, not a folder)."""
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise ConfigError(f"{label} must name a .safetensors file (quantsr writes safetensors; "
                          f"{path.suffix or 'no extension'} would not load back as one)", path)
    if path.is_dir():
        raise ConfigError(f"{label} is a folder; name a .safetensors file", path)
