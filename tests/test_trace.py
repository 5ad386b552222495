"""The generic quantization rule (models/trace.py) on a network built to hit every case."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantsr_cli.models.trace import trace_rule


class Everything(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, 1, 1)
        self.body = nn.Conv2d(8, 8, 3, 1, 1)
        self.reflect = nn.Conv2d(8, 8, 3, 1, 1, padding_mode="reflect")
        self.train_only = nn.Conv2d(8, 8, 1)
        self.tokens = nn.Linear(8, 8)
        self.borrowed = nn.Linear(8, 8)  # its weight is used directly, not by calling it
        self.squeeze = nn.Conv2d(8, 2, 1)
        self.excite = nn.Conv2d(2, 8, 1)
        self.unused = nn.Conv2d(8, 8, 1)
        self.empty = nn.Linear(8, 0)
        self.up = nn.Conv2d(8, 8 * 4, 3, 1, 1)
        self.shuffle = nn.PixelShuffle(2)
        self.hr = nn.Conv2d(8, 8, 3, 1, 1)
        self.tail = nn.Conv2d(8, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.head(x))
        x = self.reflect(x)
        if self.training:
            x = x + self.train_only(x)
        t = self.tokens(x.permute(0, 2, 3, 1))
        t = t @ self.borrowed.weight.T + self.empty(t).sum()
        x = t.permute(0, 3, 1, 2)
        x = x * torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        return self.tail(self.hr(self.shuffle(self.up(x))))


def test_every_case_of_the_generic_rule() -> None:
    torch.manual_seed(0)
    model = Everything().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 32, 32)
    rng = torch.get_rng_state()
    result = trace_rule(model, x)
    assert result.quantized == ["body", "tokens"]
    assert result.fp == {"head": "first conv", "squeeze": "channel attention (pooled input)",
                         "excite": "channel attention (pooled input)", "up": "upsampler (feeds a pixel shuffle)",
                         "hr": "upsampler (runs above the body's resolution)", "tail": "last layer"}
    assert result.unquantizable == {
        "reflect": "padding_mode='reflect' cannot be packed",
        "train_only": "called only in training mode (re-parameterised)",
        "borrowed": "its weights are read outside its own forward",
        "unused": "never called by the forward",
        "empty": "a zero-sized layer",
    }
    assert result.output_shape == (2, 3, 64, 64)
    # the model is left as it was: classes, mode, values, and the global random stream
    assert type(model.body) is nn.Conv2d and not model.training and "_quantsr_watch" not in model.body.__dict__
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
