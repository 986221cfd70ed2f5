from edge_runtime.extras import require

require("train", "python -m train")  # a device install (`.[edge]`): one sentence, exit 2, not a traceback
from train.cli import main  # noqa: E402

raise SystemExit(main())
