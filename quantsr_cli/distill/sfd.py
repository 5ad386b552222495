"""QuantSR+ SFD: L1(SR, HR) + w * mean_i ||F_student,i - F_teacher,i||_2.

As in the released code (``Q2:basicsr/models/sr_model.py:194-268``): the features are the *inputs* of
each block's feature point (``model.feature_points()``: the ReLU input of a conv block, the RSTB output
before the residual add for SwinIR), the norm is the Frobenius norm of the whole batch tensor (not
squared, not normalised), the weight defaults to 1e-4, and a block removed by QSA (``skip``) and its
successor are left out. The teacher is frozen, in eval mode, and sees the same LR batch.

Models without the residual-block contract (spandrel's architectures: no ``feature_points``) cannot
be matched block by block; with such a student or teacher the extra term is the L1 distance between
the student's and the teacher's outputs (plain output distillation, weight 1; ``--feature-weight``
does not apply).

Block mapping (teacher and student may differ in depth): with S student and T teacher blocks,
student block i is matched to teacher block ``(i + 1) * T // S - 1`` (the last block of the i-th of S
equal segments) when ``T`` is a multiple of ``S``; equal depths map one to one. Any other depth pair,
or features of different shapes, is a ConfigError.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantsr_cli.errors import ConfigError


def block_mapping(num_student: int, num_teacher: int) -> list[int]:
    """Teacher block index for each student block (see module docstring)."""
    if num_student < 1 or num_teacher < num_student or num_teacher % num_student:
        raise ConfigError(
            f"SFD needs the teacher's block count ({num_teacher}) to be a multiple of the student's ({num_student})"
        )
    ratio = num_teacher // num_student
    return [(i + 1) * ratio - 1 for i in range(num_student)]


class _Capture:
    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.value = inputs[0].clone()  # the feature point may be an inplace ReLU

    def __deepcopy__(self, memo: dict[int, Any]) -> _Capture:
        # A deep copy of the hooked model (packing copies it) gets an empty capture: the last
        # feature is part of an autograd graph, which cannot be deep-copied.
        return _Capture()


class FeatureDistillHook:
    """Trainer hook adding the SFD loss; ``student`` is the (quantized) model being trained."""

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float = 1e-4) -> None:
        s_points, t_points = student.feature_points(), teacher.feature_points()
        self.output_only = not s_points or not t_points
        if self.output_only:
            s_points = t_points = []
        self.mapping = [] if self.output_only else block_mapping(len(s_points), len(t_points))
        self.student, self.teacher, self.weight = student, teacher, weight
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.s_caps = [_Capture() for _ in s_points]
        self.t_caps = [_Capture() for _ in t_points]
        self.handles = [student.get_submodule(n).register_forward_pre_hook(c) for n, c in zip(s_points, self.s_caps)]
        self.handles += [teacher.get_submodule(n).register_forward_pre_hook(c) for n, c in zip(t_points, self.t_caps)]
        self.s_blocks = [] if self.output_only else [student.get_submodule(n) for n in student.block_names()]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def before_step(self, trainer: Any, iteration: int) -> None:
        return None

    def after_validation(self, trainer: Any, iteration: int, psnr: float) -> None:
        return None

    def active_pairs(self) -> list[int]:
        """Student block indices whose features enter the loss (not skipped, predecessor not skipped)."""
        skipped = [bool(getattr(b, "skip", False)) for b in self.s_blocks]
        return [i for i in range(len(skipped)) if not skipped[i] and not (i > 0 and skipped[i - 1])]

    def feature_loss(self) -> torch.Tensor:
        """w * mean over active blocks of ||F_s - F_t||_F, from the last student and teacher forwards."""
        terms = []
        for i in self.active_pairs():
            fs, ft = self.s_caps[i].value, self.t_caps[self.mapping[i]].value
            if fs is None or ft is None:
                continue
            if fs.shape != ft.shape:
                raise ConfigError(f"SFD feature shapes differ at student block {i}: {tuple(fs.shape)} vs teacher {tuple(ft.shape)}")
            terms.append(torch.linalg.vector_norm(fs - ft))
        if not terms:
            return torch.zeros(())
        return self.weight * torch.stack(terms).mean()

    def extra_loss(self, trainer: Any, lr: torch.Tensor, hr: torch.Tensor, sr: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(lr)
        if self.output_only:
            return (sr - target).abs().mean()
        return self.feature_loss()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
