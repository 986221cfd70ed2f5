"""Measures of the quality gate on the shared IML fields and degraded copies (issue 23 item 4).

    PYTHONPATH=. python docs/results/2026-12-06-slide-level/quality_calibration.py > calibration.log

Every field as is; every third also blurred (sigma 3 and 4 px), washed out (25% contrast) and at 0.6x.
The first run (commit b901856) also had sigma-6 blur, x0.2 dark, x2.2 bright and a blue-grey copy.
"""
import glob
import json
import time

import cv2
import numpy as np
from PIL import Image

from edge_runtime.smear import SmearError, segment
from edge_runtime.smear.quality import gate, measure

files = sorted(glob.glob('/work/shared/data/iml_malaria/fields/*.JPG'))
def degr(rgb, kind):
    if kind == "blur4":
        return cv2.GaussianBlur(rgb, (0,0), 4)
    if kind == 'blur3':
        return cv2.GaussianBlur(rgb, (0,0), 3)
    if kind == 'blur6':
        return cv2.GaussianBlur(rgb, (0,0), 6)
    if kind == 'dark':
        return (rgb*0.2).astype(np.uint8)
    if kind == 'bright':
        return np.clip(rgb.astype(float)*2.2,0,255).astype(np.uint8)
    if kind == 'faint':
        return (255 - (255-rgb.astype(float))*0.25).astype(np.uint8)
    if kind == 'small':
        return cv2.resize(rgb, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    if kind == 'bluegrey':
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(float)
        lab[:,:,1]=128+(lab[:,:,1]-128)*0.3
        lab[:,:,2]-=12
        return cv2.cvtColor(np.clip(lab,0,255).astype(np.uint8), cv2.COLOR_LAB2RGB)
    return rgb
rows=[]
for i,f in enumerate(files):
    rgb = np.asarray(Image.open(f).convert('RGB'))
    kinds = ['orig'] + (['blur3','blur4','faint','small'] if i % 3 == 0 else [])
    for k in kinds:
        t=time.perf_counter()
        try:
            seg = segment(degr(rgb,k), f)
        except SmearError as e:
            rows.append({'field':f.split('/')[-1],'kind':k,'error':e.reason})
            print(rows[-1], flush=True)
            continue
        t1=time.perf_counter()
        m = measure(seg)
        q = gate(m)
        rows.append({'field':f.split('/')[-1],'kind':k,**m.to_dict(),'readable':q.readable,'reasons':q.reasons,'measure_ms':round((time.perf_counter()-t1)*1e3,1)})
        print(rows[-1], flush=True)
json.dump(rows, open('calibration.json','w'))
print('done')
