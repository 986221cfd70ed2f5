"""medge's light runtime: numpy, Pillow and one inference runtime, never TensorFlow.

It owns the contract shared with training and conversion: the preprocessing
spec (`PreprocessSpec`) and image loading (`load_image`, `preprocess`).
"""

from edge_runtime.images import ImageError, load_and_preprocess, load_image, preprocess
from edge_runtime.spec import PreprocessSpec

__all__ = ["ImageError", "PreprocessSpec", "load_and_preprocess", "load_image", "preprocess"]
__version__ = "0.1.0"
