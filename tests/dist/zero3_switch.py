"""Run by tests/test_zero3.py under torchrun with 2 CPU ranks (gloo).

Loads a tiny LLaMA partitioned by ZeRO-3, injects LoRA-Dash (or LoRA-TSD), gives LoRA a
non-trivial update, runs the sharded switch(es), trains a few steps, exports the adapter, and
writes what the test checks to OUT/rank{r}.safetensors + OUT/rank{r}.json.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

import tsd
from pipeline.training.sharded_switch import sharded_switch
from tsd.partition import gathered, set_master_copy
from pipeline.training.distributed import skip_unused_deepspeed_comm_op

model_dir, out_dir, method = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
skip_unused_deepspeed_comm_op()  # as every rank of a run does: no op compiled
deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
      "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
      "steps_per_print": 10**9}
keep = HfDeepSpeedConfig(ds)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
cfg = tsd.TSDConfig(method=method, r=4, alpha=8, dropout=0.0, switch_step=1, num_directions=3)
torch.manual_seed(0)
tsd.inject(model, cfg)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
m = engine.module
layers = tsd.tsd_layers(m)
info = {"rank": rank, "world": world}
w0 = layers[0][1].base_layer.weight
info["local_numel"] = int(w0.ds_tensor.numel())
info["full_numel"] = int(w0.ds_numel)
info["data_numel"] = int(w0.numel())

# A non-trivial LoRA update, identical on every rank (seeded), written through ZeRO-3.
g = torch.Generator().manual_seed(1)
for name, layer in layers:
    B = torch.randn(layer.lora_B.ds_shape, generator=g) * 0.2
    with gathered([layer.lora_B], modifier_rank=0):
        layer.lora_B.data.copy_(B)
    set_master_copy(layer.lora_B, B)

def snapshot(prefix):
    t = {}
    for name, layer in layers:
        with gathered([layer.base_layer.weight, layer.lora_A, layer.lora_B]):
            t[f"{prefix}.{name}.W"] = layer.base_layer.weight.detach().clone()
            t[f"{prefix}.{name}.A"] = layer.lora_A.detach().clone()
            t[f"{prefix}.{name}.B"] = layer.lora_B.detach().clone()
    return t

# Count the base weights the switch assembles (the warm cache must assemble none).
import pipeline.training.sharded_switch as SS  # noqa: E402

base_weights = {id(layer.base_layer.weight) for _, layer in layers}
moved = []
_gather_to = SS.gather_to


def counting_gather_to(params, dst):
    moved.append(sum(id(p) in base_weights for p in params))
    return _gather_to(params, dst)


SS.gather_to = counting_gather_to

tensors = {}
kinds = ["dash"] if method == "dash" else ["init", "dash"]
info["decomposed"] = {}
info["loads"] = {}
x = torch.randint(4, 12, (2, 7), generator=torch.Generator().manual_seed(2))
for step, kind in enumerate(kinds, start=1):
    tensors.update(snapshot(f"before_{kind}"))
    rep = sharded_switch(m, kind, step, "float32")
    info["decomposed"][kind] = rep.decomposed
    info["loads"][kind] = rep.plan_loads
    if kind == "dash":  # the same switch again with an SVD cache: cold, then warm
        info["cache"] = {}
        for phase in ("cold", "warm"):
            moved.clear()
            crep = sharded_switch(m, kind, step, "float32", str(out_dir / "svd-cache"))
            info["cache"][phase] = {"hits": crep.cache_hits, "owned": len(crep.decomposed),
                                    "weights_gathered": sum(moved)}
            for d in crep.directions:
                tensors[f"sel_{phase}.{d.name}.indices"] = d.indices
                tensors[f"sel_{phase}.{d.name}.rates"] = d.change_rates
    for d in rep.directions:
        tensors[f"sel_{kind}.{d.name}.indices"] = d.indices
        tensors[f"sel_{kind}.{d.name}.U"] = d.U.contiguous()
        tensors[f"sel_{kind}.{d.name}.V"] = d.V.contiguous()
    if kind == "init":
        with torch.no_grad():
            tensors["logits_after_init"] = engine(input_ids=x).logits.detach().clone()
        tensors.update(snapshot("after_init"))
    for _ in range(3):
        out = engine(input_ids=x, labels=x)
        engine.backward(out.loss)
        engine.step()
    if kind == "init":
        tensors.update(snapshot("trained_after_init"))

for name, layer in layers:
    with gathered([layer.dash_scalars]):
        tensors[f"scalars.{name}"] = layer.dash_scalars.detach().clone()
    tensors[f"buffers.{name}.dash_U"] = layer.dash_U.clone()
engine.eval()
with torch.no_grad():
    tensors["logits"] = engine(input_ids=x).logits.detach().clone()
tensors["input_ids"] = x
state = tsd.collect_state(m)
if rank == 0:
    tsd.save_adapter(m, out_dir / "adapter", cfg, model_dir, state=state)
save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / f"rank{rank}.safetensors"))
(out_dir / f"rank{rank}.json").write_text(json.dumps(info))
# The product's way out (pipeline.training.distributed): a plain exit right after a collective
# aborts a rank now and then ("terminate called without an active exception", issue 11 item 1).
from pipeline.training.distributed import end_process, leave_process_group  # noqa: E402

leave_process_group()
end_process(0)
