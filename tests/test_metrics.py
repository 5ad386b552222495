"""Tests of quantsr_cli.metrics: BasicSR-exact PSNR/SSIM and params/MACs counting."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from quantsr_cli.metrics import calculate_psnr, calculate_ssim, count_macs, count_params, evaluate_pair, to_y_channel

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ["QUANTSR_DATA"]) if os.environ.get("QUANTSR_DATA") else REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA / "benchmarks" / "Set5" / "HR").is_dir(),
    reason=f"benchmark data not found at {DATA} (set QUANTSR_DATA)",
)

Y_WEIGHTS = np.array([65.481, 128.553, 24.966])


# ----------------------------------------------------------------------------- PSNR


def test_psnr_constant_images_rgb_and_y():
    a = np.zeros((20, 20, 3), np.uint8)
    b = np.full((20, 20, 3), 10, np.uint8)
    # RGB: MSE = 100
    assert calculate_psnr(a, b, 0, test_y_channel=False) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)
    # Y: dY = 10 * (65.481 + 128.553 + 24.966) / 255 = 10 * 219 / 255
    dy = 10 * 219 / 255
    assert calculate_psnr(a, b, 2) == pytest.approx(10 * math.log10(255**2 / dy**2), abs=1e-5)
    assert calculate_psnr(b, b, 0) == math.inf


def test_psnr_hand_computed_and_crop_border():
    a = np.full((10, 12, 3), 100, np.uint8)
    b = a.copy()
    b[4, 5] = (110, 100, 100)  # one pixel, red +10
    b[0, 0] = (0, 0, 0)  # border pixel, removed by crop_border=1
    # RGB, crop 1: 8x10x3 = 240 values, one differs by 10 -> MSE = 100 / 240
    assert calculate_psnr(a, b, 1, test_y_channel=False) == pytest.approx(10 * math.log10(255**2 * 240 / 100))
    # Y: dY = 65.481 * 10 / 255 on one of 80 pixels
    dy = 65.481 * 10 / 255
    assert calculate_psnr(a, b, 1) == pytest.approx(10 * math.log10(255**2 * 80 / dy**2), rel=1e-6)
    c = a.copy()
    c[0, :] = 0
    assert calculate_psnr(a, c, 1) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        calculate_psnr(a, a[:5], 0)


def test_y_channel_matlab_values():
    img = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    y = to_y_channel(img)[0, :, 0]
    assert y.dtype == np.float32 and y.shape == (5,)
    expected = 16 + Y_WEIGHTS.sum() * np.array([1, 0, 0, 0, 0]) + np.array([0, 0, *Y_WEIGHTS])
    assert np.allclose(y, expected, atol=1e-4)  # 235, 16, 81.481, 144.553, 40.966


def test_psnr_float_input_and_gray():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-3, 4, a.shape), 0, 255).astype(np.uint8)
    assert calculate_psnr(a, b, 2) == calculate_psnr(a.astype(np.float64), b.astype(np.float64), 2)
    g = a[..., 0]
    mse = np.mean((g[2:-2, 2:-2].astype(float) - b[2:-2, 2:-2, 0]) ** 2)
    assert calculate_psnr(g, b[..., 0], 2) == pytest.approx(10 * math.log10(255**2 / mse))


# ----------------------------------------------------------------------------- SSIM


def test_ssim_identical_and_constant():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (32, 30, 3)).astype(np.uint8)
    assert calculate_ssim(a, a, 4) == pytest.approx(1.0, abs=1e-12)
    assert calculate_ssim(a, a, 0, test_y_channel=False) == pytest.approx(1.0, abs=1e-12)
    # constant images: variances vanish, SSIM = (2 m1 m2 + c1) / (m1^2 + m2^2 + c1)
    x = np.full((20, 20), 100.0)
    y = np.full((20, 20), 120.0)
    c1 = (0.01 * 255) ** 2
    assert calculate_ssim(x, y, 0, False) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1), rel=1e-9)


def test_ssim_hand_computed_contrast_case():
    # a: m +- d checkerboard, b = m constant. In the valid region the Gaussian-filtered pattern is
    # +-off (off = d * sum(w * pattern)), so mu_a = m +- off, var_a = d^2 - off^2, cov = 0 and
    # SSIM = mean over both signs of (2 mu_a m + c1) / (mu_a^2 + m^2 + c1) * c2 / (var_a + c2).
    import cv2

    m, d = 128.0, 20.0
    a = m + d * np.where(np.add.outer(np.arange(40), np.arange(40)) % 2 == 0, 1.0, -1.0)
    b = np.full_like(a, m)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    k = cv2.getGaussianKernel(11, 1.5)
    pattern = np.where(np.add.outer(np.arange(11), np.arange(11)) % 2 == 0, 1.0, -1.0)
    off = d * float(((k @ k.T) * pattern).sum())
    var = d**2 - off**2
    expected = np.mean([(2 * mu * m + c1) / (mu**2 + m**2 + c1) * c2 / (var + c2) for mu in (m + off, m - off)])
    assert calculate_ssim(a, b, 0, False) == pytest.approx(expected, rel=1e-9)
    assert 0.05 < expected < 0.2  # contrast term c2 / (d^2 + c2) dominates: ~0.127
    with pytest.raises(ValueError, match="larger than 10x10"):
        calculate_ssim(a[:14, :14], b[:14, :14], 2, False)


# ----------------------------------------------------------------------------- evaluate_pair


def test_evaluate_pair_rounds_and_crops():
    g = torch.Generator().manual_seed(0)
    hr = torch.randint(0, 256, (1, 3, 50, 42), generator=g).float() / 255
    sr = hr[..., :48, :40] + 0.4 / 255  # rounds back to the same uint8 levels
    psnr, ssim = evaluate_pair(sr, hr, 4)
    assert psnr == math.inf and ssim == pytest.approx(1.0)
    sr2 = hr[..., :48, :40].clone()
    sr2[..., 10, 10] += 10 / 255
    hr8 = (hr[0, :, :48, :40] * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
    sr8 = (sr2[0].clamp(0, 1) * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
    assert evaluate_pair(sr2, hr, 4)[0] == calculate_psnr(sr8, hr8, 4)
    assert evaluate_pair(sr2, hr, 4, crop_border=0, test_y_channel=False)[0] == calculate_psnr(sr8, hr8, 0, False)
    with pytest.raises(ValueError, match="larger than the HR"):
        evaluate_pair(torch.zeros(1, 3, 52, 40), hr, 4)


@needs_data
def test_bicubic_baseline_set5_x4():
    """MATLAB bicubic (x4 up of the MATLAB LR) on Set5: published 28.42 dB / 0.8104 (Y)."""
    from quantsr_cli.data import BenchmarkDataset, imresize, resolve_dataset

    ds = BenchmarkDataset(resolve_dataset("Set5", DATA / "benchmarks"), 4)
    scores = [evaluate_pair(imresize(lr, 4), hr, 4) for _, lr, hr in ds]
    psnr = float(np.mean([s[0] for s in scores]))
    ssim = float(np.mean([s[1] for s in scores]))
    print(f"Set5 x4 bicubic: {psnr:.4f} dB, SSIM {ssim:.4f}")
    assert psnr == pytest.approx(28.42, abs=0.02)
    assert ssim == pytest.approx(0.8104, abs=0.002)


# ----------------------------------------------------------------------------- complexity


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1, groups=2, bias=False)
        self.down = nn.Conv2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        x = self.down(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class TinyAttention(nn.Module):
    def __init__(self, dim=10, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_act, self.k_act, self.v_act, self.attn_act = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()

    def forward(self, x):  # x: (B_, N, C)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = self.q_act(qkv[0]), self.k_act(qkv[1]), self.v_act(qkv[2])
        attn = self.attn_act((q @ k.transpose(-2, -1)).softmax(-1))
        return (attn @ v).transpose(1, 2).reshape(b, n, c)


class TinyBlock(nn.Module):
    qk_points = ("*q_act",)  # the attention operands a model declares for MAC counting
    av_points = ("*attn_act",)

    def __init__(self):
        super().__init__()
        self.attn = TinyAttention()

    def forward(self, x):
        return self.attn(x)


def test_count_params():
    net = TinyNet()
    net.fc.weight.requires_grad_(False)
    p = count_params(net)
    conv1, conv2, down, fc = 8 * 3 * 9 + 8, 8 * 4, 4 * 8 * 4 + 4, 6 * 4 + 6
    assert p["total"] == conv1 + conv2 + down + fc
    assert p["trainable"] == p["total"] - 24
    assert p["conv_linear_weights"] == 8 * 27 + 32 + 128 + 24


def test_count_macs_hand_computed():
    net = TinyNet().train()
    r = count_macs(net, (2, 3, 16, 16))
    expected = {
        "conv1": 2 * 8 * 16 * 16 * (3 * 3 * 3),
        "conv2": 2 * 8 * 16 * 16 * (8 // 2),
        "down": 2 * 4 * 8 * 8 * (8 * 2 * 2),
        "fc": 2 * 6 * 4,
    }
    assert r["layers"] == expected
    assert r["total"] == sum(expected.values()) and r["linear"] == 48 and r["matmul"] == 0
    assert net.training  # mode restored


def test_count_macs_attention_points():
    block = TinyBlock()
    b_, n, c, heads = 3, 7, 10, 2
    r = count_macs(block, x=torch.randn(b_, n, c))
    qk = b_ * heads * n * n * (c // heads)
    assert r["layers"]["attn.q_act"] == qk and r["layers"]["attn.attn_act"] == qk
    assert r["layers"]["attn.qkv"] == b_ * n * 3 * c * c
    assert r["matmul"] == 2 * qk and r["total"] == 2 * qk + b_ * n * 3 * c * c
