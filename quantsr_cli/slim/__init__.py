"""QuantSR+ QSA (slimming residual blocks during training) and QuantSR DQA (depth variants).

Both work on any model exposing ``block_names()`` whose blocks carry ``learnable_shortcut`` and a
``skip`` flag (a skipped block returns ``x * learnable_shortcut``); see DEVELOPERS.md.
"""

from quantsr_cli.slim.dqa import DQA_DEPTHS, apply_depth, dqa_keep_lists, dqa_variants
from quantsr_cli.slim.qsa import SlimHook, compact_state_dict

__all__ = ["DQA_DEPTHS", "SlimHook", "apply_depth", "compact_state_dict", "dqa_keep_lists", "dqa_variants"]
