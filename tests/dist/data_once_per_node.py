"""Run by tests/test_data_cache.py under torchrun with 2 CPU ranks (gloo).

Calls pipeline.data.training_set.training_dataset the way the training loop does, counting on
each rank the builds and the tokenizer batches it ran, in five starts:

  first     one node (the real node list): rank 0 builds, rank 1 waits and maps the same entry
  again     the same inputs: nobody builds
  shared    two "nodes" (one rank each) seeing the same cache folder: rank 0 builds for both
  local     two "nodes" with node-local folders (another path per rank): each builds its own
  bad       a malformed file: both ranks raise the same error

Writes OUT/rank<r>.json.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist

from pipeline.config import DataConfig
from pipeline.data import training_set
from pipeline.training.nodes import Node, gather_nodes

model_dir, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

from transformers import AutoTokenizer  # noqa: E402

tokenizer = AutoTokenizer.from_pretrained(model_dir)
counts = {"build": 0, "tokenize_batch": 0}
real_build, real_tokenize = training_set.build, training_set.tokenize_batch


def counting_build(*a, **k):
    counts["build"] += 1
    return real_build(*a, **k)


def counting_tokenize(*a, **k):
    counts["tokenize_batch"] += 1
    return real_tokenize(*a, **k)


training_set.build, training_set.tokenize_batch = counting_build, counting_tokenize


def start(name, nodes, cache_dir, cutoff_len=64, train=data):
    counts.update(build=0, tokenize_batch=0)
    cfg = SimpleNamespace(output_dir=str(out / "runs"),
                          data=DataConfig(train=[train], cutoff_len=cutoff_len, cache_dir=str(cache_dir)))
    try:
        ds = training_set.training_dataset(cfg, tokenizer, None, rank, nodes)
    except Exception as e:  # noqa: BLE001 -- the test compares what each rank raised
        return {"error": f"{type(e).__name__}: {e}", **counts}
    return {"rows": len(ds), "entry": str(ds.entry), "first": ds[0]["input_ids"], "last": ds[len(ds) - 1]["labels"],
            **counts}


report = {}
nodes = gather_nodes(rank, world)
report["nodes"] = [n.ranks for n in nodes]
report["first"] = start("first", nodes, out / "cache")
report["again"] = start("again", nodes, out / "cache")
two = [Node("a", "1", [0]), Node("b", "2", [1])]
report["shared"] = start("shared", two, out / "cache", cutoff_len=48)
report["local"] = start("local", two, out / f"node{rank}-cache", cutoff_len=40)
bad = out / "bad.jsonl"
if rank == 0:
    bad.write_text('{"instruction": "q", "output": "x", "answer": "x"}\n{"instruction": \n')
dist.barrier()
report["bad"] = start("bad", nodes, out / "cache", train=str(bad))
(out / f"rank{rank}.json").write_text(json.dumps(report))
dist.destroy_process_group()
