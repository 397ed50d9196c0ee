"""Run by tests/test_zero3.py under torchrun (3 CPU ranks, gloo): each model folder loaded by
pipeline.training.engine.load_model in turn, every parameter gathered whole; rank 0 writes them,
and the log lines of the path taken, to that folder's OUT.

    partitioned_load.py DIR=OUT[=whole] ...    (=whole: model.allow_whole_load, a .bin folder)

One launch for every layout the test checks: each launch costs more than its loads."""

import gc
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from pipeline.config import from_dict
from pipeline.training.engine import load_model
from tsd.partition import gathered
from pipeline.training.distributed import skip_unused_deepspeed_comm_op

skip_unused_deepspeed_comm_op()  # as every rank of a run does: no op compiled
deepspeed.init_distributed(dist_backend="gloo")
torch.set_num_threads(1)
ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
      "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9}
for entry in sys.argv[1:]:
    model_dir, out, *flags = entry.split("=")
    out = Path(out)
    if dist.get_rank() == 0:  # the log lines of this load follow the marker (the test splits on it)
        print(f"=== load {model_dir}", file=sys.stderr, flush=True)
    cfg = from_dict({"model": {"path": model_dir, "allow_whole_load": flags == ["whole"]},
                     "data": {"train": "unused.json"}})
    model, _, keep = load_model(cfg, ds)
    assert all(hasattr(p, "ds_id") for p in model.parameters()), "not partitioned"
    local = {n: p.ds_tensor.numel() for n, p in model.named_parameters()}
    full = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        with gathered([p]):
            full[name] = p.data.detach().clone()
    if dist.get_rank() == 0:
        save_file(full, str(out / "loaded.safetensors"))
        (out / "info.json").write_text(json.dumps({"local": local, "training": model.training}))
    del model, keep, full
    gc.collect()
    dist.barrier()
# The product's way out (pipeline.training.distributed): a plain exit right after a collective
# aborts a rank now and then ("terminate called without an active exception", issue 11 item 1).
from pipeline.training.distributed import end_process, leave_process_group  # noqa: E402

leave_process_group()
end_process(0)
