"""BasicSR-exact PSNR/SSIM (:mod:`.psnr_ssim`) and parameter/MAC counting (:mod:`.complexity`)."""

from quantsr_cli.metrics.complexity import count_macs, count_params
from quantsr_cli.metrics.psnr_ssim import calculate_psnr, calculate_ssim, evaluate_pair, to_y_channel

__all__ = ["calculate_psnr", "calculate_ssim", "evaluate_pair", "to_y_channel", "count_params", "count_macs"]
