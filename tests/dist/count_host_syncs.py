"""Run by tests/test_device_rules.py: the real per-rank entry (pipeline.launch.worker) on one
CPU rank with every collective path forced (TSD_FORCE_COLLECTIVES=1), counting the reads of a
tensor's value into Python (item, tolist, float(), int(), bool(), numpy) made by code in
pipeline/ or tsd/, per optimizer step. On a GPU each such read is a host synchronisation.

Step boundaries are the ends of the loop's calls of `run_due_switches` (once per optimizer step,
after the step's statistics): step k's window is its training, its bookkeeping and the switches
due after it. Writes {"windows": [[step, where, ...], ...], "code": exit code} to argv[2].

    python tests/dist/count_host_syncs.py CONFIG OUT_JSON
"""

import json
import sys
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[2]
OURS = (str(ROOT / "pipeline"), str(ROOT / "tsd"))
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
         torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.numpy}


class CountReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(OURS):
                self.reads.append(f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
        return func(*args, **(kwargs or {}))


def main() -> None:
    config, out = sys.argv[1], Path(sys.argv[2])
    import pipeline.training.loop as loop
    from pipeline.launch import worker

    counter = CountReads()
    windows, start = [], [0]
    real = loop.run_due_switches

    def boundary(s, cfg, ctx, tracker, step, result):
        real(s, cfg, ctx, tracker, step, result)
        windows.append([step, *counter.reads[start[0]:]])
        start[0] = len(counter.reads)

    loop.run_due_switches = boundary
    try:
        with counter:
            code = worker.main([config])
    except SystemExit as e:
        code = e.code
    except Exception:
        traceback.print_exc()
        code = 1
    out.write_text(json.dumps({"windows": windows, "code": code}))
    sys.stdout.flush()
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
