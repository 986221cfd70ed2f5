#!/usr/bin/env bash
# issue 27 probe: does --resize-mix make the field model answer alike under tflite-support's resize? Code 8877061 (/work/probe/code).
set -uxo pipefail
cd /work/probe/code
PY=/work/main/.venv/bin/python
for mix in 0 0.5; do
  date
  $PY -m train malaria --manifest /work/field/runs/release.csv --preset edge --init releases/malaria-field/model.keras \
     --lr 0.001 --epochs 1 --keep final --quiet --resize-mix $mix --out /work/probe/mix$mix > /work/probe/mix$mix.log 2>&1
  $PY -m convert /work/probe/mix$mix --out /work/probe/mix$mix-export --name mix$mix --formats tflite-int8 \
     --calib /work/field/runs/release.csv --eval-n 0 --allow-drop --force > /work/probe/mix$mix-convert.log 2>&1
  echo "mix $mix exit $?"
done
date
