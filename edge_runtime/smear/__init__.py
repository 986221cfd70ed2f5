"""From a thin-smear field photo to classified cells and a slide report, on the device.

    import edge_runtime
    from edge_runtime.smear import analyse_slide, write_report
    model = edge_runtime.load("malaria-edge_tflite-int8.tflite")
    report = analyse_slide(model, ["field1.jpg", "field2.jpg"], rbc_per_ul=5e6)   # a SlideReport, nothing written
    print(report.summary.parasitemia_percent, report.summary.refer)
    write_report(report, "report/")   # overlays, cells.csv/json, summary.json, contact sheet

    python -m edge_runtime smear MODEL FIELD... [--out DIR] [--json] [--min-cells N] [--rbc-per-ul X]
                                 [--wbc-count N] [--normalise [MODE]]

The malaria model was trained on NIH crops: one segmented red blood cell on a
black background. A field photo holds ~100 cells, many touching, so this
package finds them first (classical image processing, OpenCV), cuts each the
NIH way (mask applied, black outside, tight box) and classifies every cell of
a field in one `EdgeModel.predict` call.

The package, one job per module (each imports only the ones above it):
- `cells`: finding the cells of a field photo (segmentation, splitting touching cells, typing regions).
- `crops`: cutting each cell the NIH way, and the optional stain normalisation.
- `quality`: the per-field quality gate (focus, exposure, stain, density, segmentation sanity): a field it
  refuses says "can't read this field: retake (reason)" and is not counted.
- `decision`: the slide decision and its counts as a microscopist makes them (counting rule, parasites/µL on
  one named basis with a Poisson 95% interval), pure functions.
- `slide`: classifying the red cells; the typed results `SlideReport` (`FieldResult`s of `CellResult`s, a
  `SlideSummary`) that `analyse_field` and `analyse_slide` return.
- `report`: drawing and writing what a person checks from a `SlideReport` (`write_report`: overlays,
  cells.csv/json, summary.json, contact sheet).
"""

from edge_runtime.smear.cells import (
    ARC_RADII,
    ARC_SHARE,
    BACKGROUND_SIGMAS,
    CANDIDATE_SPOT,
    CHROMATIN_COSINE,
    CLUMP_AREA,
    DEBRIS_AREA,
    EDGE_AREA,
    INK_LEVEL,
    INK_SHARE,
    KINDS,
    MARKER_DEPTH,
    MARKER_SPACING,
    MAX_SIDE,
    MERGE_AREA,
    MIN_RADIUS,
    MIN_SINGLE_CELLS,
    SINGLE_SOLIDITY,
    STAIN_COHERENCE,
    VOTE_RADII,
    WBC_NUCLEUS_AREA,
    WBC_PART_AREA,
    Cell,
    Segmentation,
    SmearError,
    flatten_background,
    segment,
)
from edge_runtime.smear.crops import (
    BACKGROUND_REF,
    CHROMA_SHIFT,
    NIH_LAB_MEAN,
    NIH_LAB_STD,
    NORMALISATIONS,
    crop,
    normalise_background,
    normalise_stain,
    normalised,
)
from edge_runtime.smear.decision import COUNTING_RULES, DEFAULT_RULE, SlideDecision, decide
from edge_runtime.smear.quality import LIMITS, FieldQuality, gate, measure
from edge_runtime.smear.report import (
    CONTACT_TILE,
    CSV_FIELDS,
    VERDICT_COLOURS,
    contact_sheet,
    render_overlay,
    write_report,
)
from edge_runtime.smear.slide import (
    CellResult,
    FieldResult,
    FieldView,
    SlideReport,
    SlideSummary,
    analyse_field,
    analyse_slide,
)

__all__ = [
    "COUNTING_RULES", "DEFAULT_RULE", "LIMITS", "FieldQuality", "SlideDecision", "decide", "gate", "measure",
    "ARC_RADII", "ARC_SHARE", "BACKGROUND_REF", "BACKGROUND_SIGMAS", "CANDIDATE_SPOT", "CHROMATIN_COSINE",
    "CHROMA_SHIFT", "INK_LEVEL", "INK_SHARE", "CLUMP_AREA", "CONTACT_TILE", "CSV_FIELDS", "DEBRIS_AREA", "EDGE_AREA",
    "KINDS", "MARKER_DEPTH", "MARKER_SPACING", "MAX_SIDE", "MERGE_AREA", "MIN_RADIUS", "MIN_SINGLE_CELLS",
    "NIH_LAB_MEAN", "NIH_LAB_STD", "NORMALISATIONS", "SINGLE_SOLIDITY", "STAIN_COHERENCE", "VERDICT_COLOURS",
    "VOTE_RADII", "WBC_NUCLEUS_AREA", "WBC_PART_AREA", "Cell", "CellResult", "FieldResult", "Segmentation",
    "FieldView", "SlideReport", "SlideSummary", "SmearError", "analyse_field", "analyse_slide", "contact_sheet",
    "crop", "flatten_background", "normalise_background", "normalise_stain", "normalised", "render_overlay",
    "segment", "write_report",
]
