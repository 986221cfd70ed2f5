"""A contact sheet of 12 missed cells of one cause (rows.json from miss.py): annotation green, best region red.

    python docs/results/2026-12-07-cell-misses/sheet.py "CAUSE" OUT.png   # repo root
"""

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from edge_runtime.smear.cells import segment
from train.annotations import iou_matrix

FIELDS = Path("../shared/data/iml_malaria/fields")


def main(cause, out, tile=220):
    rows = [r for r in json.loads(Path("/tmp/miss/rows.json").read_text()) if r["cause"] == cause]
    random.Random(0).shuffle(rows)
    sheet, segs = Image.new("RGB", (4 * tile, 3 * tile), "white"), {}
    for i, r in enumerate(rows[:12]):
        img = Image.open(FIELDS / r["field"]).convert("RGB")
        seg = segs.setdefault(r["field"], segment(img, r["field"]))
        x, y, w, h = r["box"]
        k = int(iou_matrix([r["box"]], [c.bbox for c in seg.cells])[0].argmax())
        fb = seg.cells[k].bbox
        half = 1.1 * max(w, h, fb[2], fb[3])
        view = (int(x + w / 2 - half), int(y + h / 2 - half), int(x + w / 2 + half), int(y + h / 2 + half))
        d = ImageDraw.Draw(img)
        for c in seg.cells:
            bx, by, bw, bh = c.bbox
            if bx < view[2] and by < view[3] and bx + bw > view[0] and by + bh > view[1]:
                d.rectangle([bx, by, bx + bw, by + bh], outline=(80, 80, 255), width=1)
        d.rectangle([x, y, x + w, y + h], outline=(0, 200, 0), width=3)
        d.rectangle([fb[0], fb[1], fb[0] + fb[2], fb[1] + fb[3]], outline=(255, 0, 0), width=2)
        t = img.crop(view).resize((tile, tile))
        ImageDraw.Draw(t).text((3, 3), f"{r['field'][:8]} IoU {r['iou']} {seg.cells[k].kind}", fill=(0, 0, 0))
        sheet.paste(t, ((i % 4) * tile, (i // 4) * tile))
    sheet.save(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
