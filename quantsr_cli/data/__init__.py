"""Image IO (cv2), MATLAB-compatible bicubic resize, benchmark and training datasets.

Modules: :mod:`.io` (``read_image``, ``write_image``, ``tensor_to_uint8``), :mod:`.imresize`
(``imresize``, ``imresize_uint8``, ``matlab_lr``), :mod:`.datasets` (``resolve_dataset``,
``BenchmarkDataset``), :mod:`.training` (``TrainDataset``, ``check_patch_size``). The names are re-exported here.
"""

from quantsr_cli.data.datasets import (
    BENCHMARKS,
    BenchmarkDataset,
    cache_dir,
    data_root_default,
    no_data_hint,
    resolve_dataset,
    shared_data_dir,
)
from quantsr_cli.data.imresize import imresize, imresize_uint8, matlab_lr
from quantsr_cli.data.io import MAX_PIXELS, Image, list_images, read_image, tensor_to_uint8, write_image
from quantsr_cli.data.training import TrainDataset, check_patch_size

__all__ = [
    "BENCHMARKS", "BenchmarkDataset", "TrainDataset", "cache_dir", "data_root_default", "no_data_hint", "resolve_dataset",
    "shared_data_dir", "imresize", "imresize_uint8", "matlab_lr", "MAX_PIXELS", "Image", "list_images",
    "read_image", "tensor_to_uint8", "write_image", "check_patch_size",
]
