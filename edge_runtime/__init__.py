"""medge's light runtime: numpy, Pillow and one inference runtime, never TensorFlow.

    import edge_runtime
    model = edge_runtime.load("export/malaria-edge_tflite-int8.tflite")
    results = model.predict(["cell1.png", "cell2.png"])

    python -m edge_runtime predict export/malaria-edge_tflite-int8.tflite slide_C100/ --csv
    python -m edge_runtime info export/malaria-edge_tflite-int8.tflite

It owns the contract shared with training and conversion: the preprocessing
spec (`PreprocessSpec`), image loading (`load_image`, `preprocess`) and the
artifact metadata (`edge_runtime.metadata`). Runtimes are imported only by
their backend module, on first use (`edge_runtime.backends`).
"""

from edge_runtime.backends import BACKENDS, BackendError
from edge_runtime.images import ImageError, load_and_preprocess, load_image, preprocess
from edge_runtime.model import UNCERTAIN, EdgeModel, ModelChanged, ModelError, Prediction, load
from edge_runtime.spec import PreprocessSpec

__all__ = ["BACKENDS", "BackendError", "EdgeModel", "ImageError", "ModelChanged", "ModelError", "Prediction",
           "PreprocessSpec",
           "UNCERTAIN", "load", "load_and_preprocess", "load_image", "preprocess"]
__version__ = "0.1.0"
