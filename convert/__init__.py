"""medge's converter: Keras models to LiteRT (.tflite) and ONNX (.onnx, .ort), each proven against Keras.

    python -m convert runs/malaria-edge --out runs/malaria-edge/export --formats all
    python -m convert inspect runs/malaria-edge/export/malaria-edge_tflite-int8.tflite

The format table (`convert.formats.FORMATS`) imports nothing heavy; the
exporters import TensorFlow, tf2onnx and onnxruntime only when they run.
"""

from convert.formats import FORMATS, Format, parse_formats

__all__ = ["FORMATS", "Format", "parse_formats"]
