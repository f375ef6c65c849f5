"""One nest capture with a given checkout's library, each training step timed in the process
(benchmarks/bench_capture.py runs it in the nest env).

    python benchmarks/timed_capture.py CHECKOUT CAPTURE_ARGS...

Prints, as its last line, a JSON list: each step's seconds from its batch's start to the next
batch's start (the last step's to the end of training, which commits it).
"""

import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(sys.argv[1]).resolve() / "src"))  # before any of its imports
    from nest_ssl.training import NestPretraining
    from nestalign.callback import CaptureCallback
    from nestalign.runner import capture_main

    starts: list[float] = []
    on_start, on_end = CaptureCallback.on_train_batch_start, CaptureCallback.on_train_end

    def timed_start(self, *args, **kwargs):
        starts.append(time.perf_counter())
        return on_start(self, *args, **kwargs)

    def timed_end(self, *args, **kwargs):
        on_end(self, *args, **kwargs)  # commits the last step
        starts.append(time.perf_counter())

    CaptureCallback.on_train_batch_start = timed_start
    CaptureCallback.on_train_end = timed_end
    capture_main(
        sys.argv[2:], "nest", lambda cfg, tr: NestPretraining(cfg=cfg, trainer=tr), "bench"
    )
    print(json.dumps([b - a for a, b in zip(starts, starts[1:], strict=False)]))
