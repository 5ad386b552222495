"""quantsr: 2/4-bit quantization-aware training and packed inference for image super-resolution.

Nothing runs at import time; import the sub-packages you need (``quantsr_cli.models``,
``quantsr_cli.quant``, ``quantsr_cli.packing`` ...). The command line lives in ``quantsr_cli.cli``.
"""

__version__ = "0.1.0"
