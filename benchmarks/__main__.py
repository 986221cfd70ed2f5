from edge_runtime.extras import require

require("train", "python -m benchmarks")  # it builds and converts the models it measures
from benchmarks.cli import main  # noqa: E402

raise SystemExit(main())
