"""The one timing function every number in the report comes from: warm-up runs, then timed runs.

It lives in `edge_runtime.timing` (numpy only), so `convert` times with the
same loop; re-exported here for the benchmarks.
"""

from edge_runtime.timing import time_fn

__all__ = ["time_fn"]
