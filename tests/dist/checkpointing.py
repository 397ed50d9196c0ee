"""Run by tests/test_checkpointing.py under torchrun with 2 CPU ranks (gloo): the same loss and
gradients with and without gradient checkpointing under ZeRO-3.

For LoRA-TSD after both switches (LoRA on the residual base plus the dash term, dropout on) and
for full fine-tuning: one forward/backward of the same batch without, then with, transformers'
non-reentrant checkpointing (pipeline.training.engine.enable_gradient_checkpointing), from the
same RNG state; each rank writes the loss and every trainable parameter's full gradient to
OUT/<case>-<mode>-rank<r>.safetensors.

    torchrun --nproc_per_node 2 tests/dist/checkpointing.py MODEL_DIR OUT
"""

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

import tsd
from pipeline.training.engine import enable_gradient_checkpointing
from pipeline.training.sharded_switch import sharded_switch
from tsd.partition import gathered, set_master_copy
from pipeline.training.distributed import skip_unused_deepspeed_comm_op

model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
skip_unused_deepspeed_comm_op()  # as every rank of a run does: no op compiled
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
DS = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
      "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
      "steps_per_print": 10**9, "zero_allow_untested_optimizer": True}
ids = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(7 + rank))


def build(case: str):
    keep = HfDeepSpeedConfig(DS)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if case == "tsd":
        torch.manual_seed(0)
        tsd.inject(model, tsd.TSDConfig(method="tsd", r=4, alpha=8, dropout=0.1, switch_step=1, num_directions=3))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0)  # the passes compare gradients; the weights must not move
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=DS)
    if case == "tsd":
        g = torch.Generator().manual_seed(1)
        for _, layer in tsd.tsd_layers(engine.module):  # a LoRA update for the switches to rate
            B = torch.randn(layer.lora_B.ds_shape, generator=g) * 0.2
            with gathered([layer.lora_B], modifier_rank=0):
                layer.lora_B.data.copy_(B)
            set_master_copy(layer.lora_B, B)
        sharded_switch(engine.module, "init", 1)
        sharded_switch(engine.module, "dash", 2)
        with torch.no_grad():  # nonzero dash scalars, so the dash term reaches the gradients of A and B
            for _, layer in tsd.tsd_layers(engine.module):
                with gathered([layer.dash_scalars], modifier_rank=0):
                    layer.dash_scalars.data.copy_(torch.linspace(0.5, 1.5, layer.dash_size))
                set_master_copy(layer.dash_scalars, torch.linspace(0.5, 1.5, layer.dash_size))
        from deepspeed.utils import safe_get_full_fp32_param

        # dash_scalars has 3 elements on 2 ranks: a padded last slice, where DeepSpeed's own full
        # setter fails (tsd.partition.set_master_copy writes each rank's slice instead).
        masters = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters() if "dash_scalars" in n}
        save_file({n: m.detach().clone() for n, m in masters.items()}, str(out_dir / f"masters-rank{rank}.safetensors"))
    return engine, keep


def one_pass(engine, case: str, mode: str) -> None:
    module = engine.module
    if mode == "checkpointed":
        enable_gradient_checkpointing(module)
    else:
        module.gradient_checkpointing_disable()
    engine.train()
    calls = []  # forwards of the first layer's attention: a checkpointed layer runs twice
    hook = module.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(1234 + rank)  # the same dropout masks in both passes
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    hook.remove()
    grads = {"loss": loss.detach().reshape(1).clone(), "forward_calls": torch.tensor([len(calls)])}
    for name, p in module.named_parameters():
        if p.requires_grad:
            grads[name] = safe_get_full_grad(p).detach().clone()
    engine.step()  # lr 0: clears the gradients, moves nothing
    save_file(grads, str(out_dir / f"{case}-{mode}-rank{rank}.safetensors"))


for case in ("tsd", "full"):
    engine, keep = build(case)
    for mode in ("plain", "checkpointed"):
        one_pass(engine, case, mode)
    del engine, keep
dist.barrier()
dist.destroy_process_group()
