import sys

from edge_runtime.extras import require

if sys.argv[1:2] != ["inspect"]:  # `convert inspect FILE` reads an artifact with edge_runtime alone
    require("train", "python -m convert")
from convert.cli import main

raise SystemExit(main())
