"""Bit layouts, packed modules (reference forward) and quantsr safetensors files.

* :mod:`~quantsr_cli.packing.layout` — :class:`PackFormat`, ``pack_codes`` / ``unpack_codes``.
* :mod:`~quantsr_cli.packing.modules` — ``PackedConv2d``, ``PackedLinear``, ``PackedActQuant``.
* :mod:`~quantsr_cli.packing.convert` — QAT model -> packed model, and back from file contents.
* :mod:`~quantsr_cli.packing.io` — ``save_file`` / ``read_file`` / ``load_model_file`` ... (the only
  safetensors user).
"""

from quantsr_cli.packing.layout import PackFormat, pack_codes, unpack_codes
from quantsr_cli.packing.modules import PackedActQuant, PackedConv2d, PackedLinear, PackedModule

__all__ = [
    "PackFormat", "pack_codes", "unpack_codes", "PackedConv2d", "PackedLinear", "PackedActQuant", "PackedModule",
]
