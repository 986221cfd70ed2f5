"""MediaPipe Tasks as an app uses it, run in MediaPipe's own environment (not medge's): the client of test_mediapipe.

    # python3 -m venv ... && pip install "mediapipe==0.10.21" "numpy<2"
    MEDGE_MEDIAPIPE_PYTHON=/work/mp-venv/bin/python
    $MEDGE_MEDIAPIPE_PYTHON tests/mediapipe_client.py MODEL.tflite IMAGE [IMAGE ...] > answers.json

For each model it prints, as JSON: what MediaPipe's metadata reader finds in
the file (`MetadataDisplayer`: the metadata JSON and the packed files, with
labels.txt's text) and, per image, the categories `vision.ImageClassifier`
returns (all of them, by score) with nothing configured but the model file:
normalisation and labels come from the file's metadata. Images are decoded
with Pillow to RGB, as an app hands a decoded bitmap to MediaPipe.

Imports only MediaPipe, numpy, Pillow and the standard library: medge is not
installed there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: mediapipe_client.py MODEL.tflite IMAGE [IMAGE ...]", file=sys.stderr)
        return 2
    import mediapipe as mp
    import numpy as np
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions
    from mediapipe.tasks.python.metadata import metadata
    from PIL import Image

    model = Path(argv[0])
    buf = model.read_bytes()
    displayer = metadata.MetadataDisplayer.with_model_buffer(buf)
    packed = displayer.get_packed_associated_file_list()
    out = {
        "mediapipe": mp.__version__,
        "model": str(model),
        "metadata": json.loads(displayer.get_metadata_json()),
        "packed_files": {n: displayer.get_associated_file_buffer(n).decode("utf-8") for n in packed},
        "images": [],
    }
    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(model)), max_results=-1)
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for p in argv[1:]:
            with Image.open(p) as im:
                rgb = np.ascontiguousarray(np.asarray(im.convert("RGB")))
            result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb))
            cats = result.classifications[0].categories
            out["images"].append({"path": p, "categories": [{"label": c.category_name, "index": c.index,
                                                             "score": float(c.score)} for c in cats]})
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
