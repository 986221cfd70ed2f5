"""medge's benchmarks: float32 against int8 artifacts, side by side, on this machine.

    python -m benchmarks
    python -m benchmarks --models malaria-edge --formats tflite-float32,tflite-int8 --threads 1 --n-images 100

Rows are model x format (convert's format table) x thread count, plus the
Keras model as the reference; see `benchmarks.run.ROW_FIELDS`. Importing this
package imports nothing heavy.
"""
