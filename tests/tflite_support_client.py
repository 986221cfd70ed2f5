"""Google's tflite-support as an app uses it, run in its own environment (not medge's): a client of test_clients.

    python3 -m venv /work/tfls && /work/tfls/bin/pip install "tflite-support==0.4.4" "numpy<2" Pillow
    apt-get install libusb-1.0-0        # its native library links against libusb (ImportError without it)
    /work/tfls/bin/python tests/tflite_support_client.py MODEL.tflite IMAGE [IMAGE ...] > answers.json

For the model it prints, as JSON: what tflite-support's metadata reader finds
in the file (`MetadataDisplayer`: the metadata JSON and the packed files, with
labels.txt's text) and, per image, the categories its Task library's
`vision.ImageClassifier` returns (all of them, by score) with nothing
configured but the model file: normalisation and labels come from the file's
metadata. Images are decoded with Pillow to RGB, as an app hands a decoded
bitmap to the classifier.

Imports only tflite-support, numpy, Pillow and the standard library: medge is
not installed there.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: tflite_support_client.py MODEL.tflite IMAGE [IMAGE ...]", file=sys.stderr)
        return 2
    import numpy as np
    from PIL import Image
    from tflite_support import metadata
    from tflite_support.task import core, processor, vision

    model = Path(argv[0])
    displayer = metadata.MetadataDisplayer.with_model_file(str(model))
    packed = displayer.get_packed_associated_file_list()
    out = {
        "tflite_support": importlib.metadata.version("tflite-support"),
        "model": str(model),
        "metadata": json.loads(displayer.get_metadata_json()),
        "packed_files": {n: displayer.get_associated_file_buffer(n).decode("utf-8") for n in packed},
        "images": [],
    }
    options = vision.ImageClassifierOptions(base_options=core.BaseOptions(file_name=str(model)),
                                            classification_options=processor.ClassificationOptions(max_results=-1))
    classifier = vision.ImageClassifier.create_from_options(options)
    for p in argv[1:]:
        with Image.open(p) as im:
            rgb = np.ascontiguousarray(np.asarray(im.convert("RGB")))
        result = classifier.classify(vision.TensorImage.create_from_array(rgb))
        cats = result.classifications[0].categories
        out["images"].append({"path": p, "categories": [{"label": c.category_name, "index": c.index,
                                                         "score": float(c.score)} for c in cats]})
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
