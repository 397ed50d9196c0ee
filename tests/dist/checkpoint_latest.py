"""Run by tests/test_reliability.py under torchrun with 2 CPU ranks (gloo).

Saves one checkpoint through pipeline.training.checkpoint.save_checkpoint with rank 1's writes held
back 1 s, and records on rank 1, just before each of its files is written, what `latest`
names: it must never name the tag being written (a rank killed then would leave `latest`
pointing at a tag that is not whole). Writes OUT/seen_rank1.json.
"""

import json
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from pipeline.training.checkpoint import save_checkpoint, tag_problem, weights_only_checkpoint_engine
from pipeline.training.distributed import skip_unused_deepspeed_comm_op

model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
skip_unused_deepspeed_comm_op()  # as every rank of a run does: no op compiled
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9}
keep = HfDeepSpeedConfig(ds)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds)
engine.checkpoint_engine = weights_only_checkpoint_engine(engine.checkpoint_engine)
ckpt = out_dir / "checkpoints"
seen = []
if rank == 1:
    save = engine.checkpoint_engine.save

    def late_save(state_dict, path):
        latest = ckpt / "latest"
        for _ in range(2):  # what `latest` names as this write starts, and 1 s into it
            seen.append(latest.read_text() if latest.is_file() else None)
            print("rank1", time.time(), path, seen[-1], flush=True)
            time.sleep(1.0)
        return save(state_dict, path)

    engine.checkpoint_engine.save = late_save
save_checkpoint(engine, ckpt, 1, 1, {"phase_start": 0})
if rank == 1:
    (out_dir / "seen_rank1.json").write_text(json.dumps(
        {"latest_before_each_write": seen, "problem": tag_problem(ckpt / "step1", 1, bf16=False),
         "latest_after": (ckpt / "latest").read_text()}))
# The product's way out (pipeline.training.distributed): a plain exit right after a collective
# aborts a rank now and then ("terminate called without an active exception", issue 11 item 1).
from pipeline.training.distributed import end_process, leave_process_group  # noqa: E402

leave_process_group()
end_process(0)
