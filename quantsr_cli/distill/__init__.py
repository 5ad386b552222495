"""QuantSR+ SFD: self-feature distillation from a full-precision teacher."""

from quantsr_cli.distill.sfd import FeatureDistillHook, block_mapping

__all__ = ["FeatureDistillHook", "block_mapping"]
