"""Run by tests/test_architectures.py under torchrun with 2 CPU ranks (gloo): one tiny random-init
model of each architecture through the ZeRO-3 path of the pipeline with LoRA-TSD.

For each: rank 0 saves the model folder; every rank loads it with pipeline.training.engine.load_model
(partitioned: each rank reads its slices; asserted: no rank's parameter holds more than its share),
injects LoRA-TSD, gives LoRA an update, runs the sharded init switch, a step, the dash switch, a
step; the trained model's logits on a fixed batch (a ZeRO-3 forward); the adapter exported (rank 0)
and reloaded by stock PEFT on the base loaded whole by transformers: its logits against the trained
model's. Writes OUT/<arch>.json per architecture (rank 0).

Mixtral's checkpoint names (block_sparse_moe.experts.N.w1) are fused by transformers at load into
3-D expert tensors: the pipeline cannot read them slice by slice, so the folder is refused by name,
and loads whole on rank 0 with model.allow_whole_load. Its experts are 3-D parameters, not
nn.Linear layers, so LoRA targets its attention.

    torchrun --nproc_per_node 2 tests/dist/architectures.py OUT
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

import tsd
from pipeline.config import from_dict
from pipeline.data.synthetic import make_tokenizer
from pipeline.training.distributed import end_process, leave_process_group
from pipeline.training.engine import load_model
from pipeline.training.sharded_switch import sharded_switch
from tsd.export import collect_state, save_adapter
from tsd.partition import gathered, set_master_copy
from pipeline.training.distributed import skip_unused_deepspeed_comm_op

out = Path(sys.argv[1])
skip_unused_deepspeed_comm_op()  # as every rank of a run does: no op compiled
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
DS = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
      "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
      "steps_per_print": 10**9, "zero_allow_untested_optimizer": True}
COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATTENTION + ["gate_proj", "up_proj", "down_proj"]


def configs():
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config

    return {
        "llama-untied": (LlamaConfig(**COMMON, tie_word_embeddings=False), ALL, None),
        "llama-tied-sharded": (LlamaConfig(**COMMON, tie_word_embeddings=True), ALL, "8KB"),
        "qwen2": (Qwen2Config(**COMMON), ALL, None),
        "mistral": (MistralConfig(**COMMON), ALL, None),
        "gemma3": (Gemma3TextConfig(**COMMON, head_dim=8), ALL, None),
        "mixtral": (MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2), ATTENTION, None),
    }


def save_folder(name: str, config, shard: str | None) -> Path:
    folder = out / "models" / name
    if rank == 0:
        tokenizer = make_tokenizer(["a b c d e f g h i j k l m n o p"])
        config.vocab_size = 64
        config.pad_token_id, config.bos_token_id, config.eos_token_id = (tokenizer.pad_token_id, tokenizer.bos_token_id,
                                                                         tokenizer.eos_token_id)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # weights of std 0.2: logits far enough apart to compare
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.2)
        model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
        tokenizer.save_pretrained(folder)
    dist.barrier()
    return folder


def run(name: str, config, targets: list[str], shard: str | None) -> dict:
    folder = save_folder(name, config, shard)
    result = {"arch": name, "files": sorted(p.name for p in folder.glob("*.safetensors"))}
    base = {"model": {"path": str(folder), "dtype": "float32"}, "data": {"train": "unused.json"}}
    try:
        load_model(from_dict(base), DS)
        result["refused"] = None
    except ValueError as e:
        result["refused"] = str(e)
        base["model"]["allow_whole_load"] = True
    unset_hf_deepspeed_config()
    model, _, keep = load_model(from_dict(base), DS)
    big = [p for p in model.parameters() if p.ds_numel >= 256]
    result["partitioned"] = all(hasattr(p, "ds_id") for p in model.parameters())
    result["largest_share"] = max(p.ds_tensor.numel() / p.ds_numel for p in big)
    torch.manual_seed(0)
    report = tsd.inject(model, tsd.TSDConfig(method="tsd", r=4, alpha=8, dropout=0.0, switch_step=1,
                                             num_directions=3, targets=targets))
    result["layers"] = len(tsd.tsd_layers(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=DS)
    g = torch.Generator().manual_seed(1)
    for _, layer in tsd.tsd_layers(engine.module):
        B = torch.randn(layer.lora_B.ds_shape, generator=g) * 0.2
        with gathered([layer.lora_B], modifier_rank=0):
            layer.lora_B.data.copy_(B)
        set_master_copy(layer.lora_B, B)
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    engine.train()
    for step, kind in ((1, "init"), (2, "dash")):
        sharded_switch(engine.module, kind, step)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    engine.eval()
    with torch.no_grad():
        trained = engine(input_ids=ids).logits.float()
    state = collect_state(engine.module)
    adapter = folder.parent / f"{name}-adapter"
    if rank == 0:
        save_adapter(engine.module, adapter, tsd.TSDConfig(method="tsd", r=4, alpha=8, switch_step=1,
                                                           num_directions=3, targets=targets),
                     base_model_name_or_path=str(folder), state=state)
    dist.barrier()
    del engine, model, keep
    unset_hf_deepspeed_config()
    if rank == 0:
        from peft import PeftModel

        plain = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        peft = PeftModel.from_pretrained(plain, str(adapter)).eval()
        with torch.no_grad():
            reloaded = peft(input_ids=ids).logits.float()
        result["max_logit_diff"] = float((reloaded - trained).abs().max())
        result["logit_scale"] = float(trained.abs().max())
        result["switch_steps"] = sorted({int(v) for k, v in state.items() if k.endswith(("init_step", "dash_step"))})
        (out / f"{name}.json").write_text(json.dumps(result))
    dist.barrier()
    return result


for arch, (config, targets, shard) in configs().items():
    run(arch, config, targets, shard)
leave_process_group()
end_process(0)
