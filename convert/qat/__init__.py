"""The `tflite-qat-int8` row: quantization-aware fine-tuning, then full int8.

tensorflow-model-optimization (tfmot) works only with tf-keras and needs
`TF_USE_LEGACY_KERAS=1` before TensorFlow is first imported, while the rest of
medge uses Keras 3. So the fine-tuning runs in its own process:

    job.py          the protocol: `QatJob` (parent -> child, a JSON file) and `QatResult` (child -> parent,
                    one tagged stdout line), frozen dataclasses whose from_dict rejects unknown keys
    parent.py       Keras 3 side: `export_qat_int8` (the format table's exporter) writes the job and the
                    weights, runs `python -m convert.qat.child JOB.json`, streams its progress, kills it when
                    interrupted, reads its result
    child.py        tf-keras side: twin, annotation, fine-tune, conversion with `convert.converters.int8_config`
    twin.py         the tf-keras twin: built from the architecture code, Keras weights copied layer by layer
    tfmot_fixes.py  every tfmot workaround and all private tfmot API use, with the upstream issues; checks
                    the installed tfmot is the pinned version

The child builds a tf-keras twin of the run's network with the same
architecture code, copies the Keras 3 weights layer by layer, checks the twin
reproduces the Keras probabilities, annotates the model for quantization,
fine-tunes it, and converts to full int8 with the same real calibration data
and converter settings as `tflite-int8`. Twins (`QatJob.architecture.kind`):

    resnet     a malaria run: `train.malaria.models.build_resnet(..., keras_module=tf_keras)`;
               fine-tuned on the run's training images (training
               preprocessing, no augmentation: a short fine-tune from trained weights)
    oct-fused  an OCT run's image -> class model: `train.oct.models.build_fused_flat`,
               InceptionV3 and the head in one flat graph (tfmot cannot quantize a
               nested model); the base stays frozen as in training, so the
               fine-tune adapts the head to quantization noise everywhere
    oct-head   an OCT run's head alone (`--part head`): fine-tuned on the
               training split of the run's feature store, read row by row

Importing this package imports neither TensorFlow nor Keras.
"""

from convert.qat.job import Architecture, QatJob, QatResult
from convert.qat.parent import export_qat_int8, twin_architecture
from convert.qat.twin import copy_weights, flat_weights

__all__ = ["Architecture", "QatJob", "QatResult", "copy_weights", "export_qat_int8", "flat_weights",
           "twin_architecture"]
