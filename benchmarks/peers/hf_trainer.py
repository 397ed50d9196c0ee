"""Hugging Face Trainer + PEFT peer of bench_peers.py, one process per rank under torchrun.

    torchrun --standalone --nproc_per_node 2 benchmarks/peers/hf_trainer.py CONFIG --steps N \
        --strategy zero3|zero2|ddp --ds-config DS.json --threads 1 --out-dir DIR [--set KEY=VALUE ...] [--no-fix]

  zero3 / zero2: TrainingArguments(deepspeed=DS.json) (a resolved config, no "auto" left), the
                 model loaded after TrainingArguments so that under ZeRO-3 transformers builds
                 it partitioned (deepspeed.zero.Init), the Trainer's torch AdamW handed to DeepSpeed.
  ddp:           the Trainer's own DistributedDataParallel on CPU (use_cpu=True: accelerate's
                 MULTI_CPU, gloo); no DeepSpeed.

THE CPU FIX (zero3 / zero2 only; `--no-fix` runs stock accelerate to show the defect).
accelerate 1.15's `PartialState._prepare_backend` only finds a distributed backend for an
accelerator (CUDA, XPU, NPU, ...) or when asked for CPU (`cpu=True`, i.e. `use_cpu=True`). On a
CPU-only machine with `use_cpu=False` (which DeepSpeed needs: with cpu=True accelerate never
takes its DeepSpeed path) it returns backend None, so `PartialState` records num_processes=1,
process_index=0 on every rank, even though DeepSpeed has initialised a 2-rank gloo group and
the engine all-reduces over it. The Trainer's dataloader is then prepared for one process (no
`BatchSamplerShard`): every rank iterates the whole dataset and both train on the same
batches (and `args.world_size` is 1, every rank is "main process"). The fix wraps
`_prepare_backend` so that, under a launcher (LOCAL_RANK set, WORLD_SIZE > 1) with no
accelerator found, it answers ("gloo", MULTI_CPU), what it answers for cpu=True; `PartialState`
then still initialises DeepSpeed's communication (use_cpu stays False) and ends as DEEPSPEED
with num_processes = WORLD_SIZE and process_index = RANK, so the dataloader shards.
Not fixed, because this benchmark does not save: the empty adapter. Under ZeRO-3 with
`stage3_gather_16bit_weights_on_model_save: false` (the project's zero3.json) the Trainer's
save_model gets no state dict from accelerate ("Saving the full checkpoint instead") and PEFT
writes the rank's partitioned (empty) LoRA tensors; `save_strategy="no"` here, nothing is saved.

Data: the examples, their order and the global batches of lora-tsd (benchmarks/peers/_data.py).
The dataset is laid out so that accelerate's round-robin batch sharding (batch b -> rank
b % world) gives rank r exactly lora-tsd's rank-r micro-batch of each step; the Trainer's
sampler is sequential. Each example carries its index (`ex_id`), taken out before the model
sees the batch and printed with the step, so the driver checks what every rank trained on.
Schedule: the project's (lr_lambda_factory) instead of the Trainer's linear warmup (which starts
at 0); AdamW (`optim="adamw_torch"`), max_grad_norm = train.grad_clip, logging_steps=1 (the
project logs every step too). Per step every rank prints on stderr:
  [peer rank R] step k/N loss L lr X T tok/s S s/step tokens T ids i,j
(L is the Trainer's loss of that rank: normalised by the global label count x world size when
the Trainer averages tokens across devices; the step time is between consecutive step ends.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data as D  # noqa: E402


def apply_cpu_fix() -> None:
    """See the module's doc: accelerate finds no backend on a CPU-only machine unless cpu=True."""
    import accelerate.state as S
    from accelerate.utils import DistributedType

    original = S.PartialState._prepare_backend
    if getattr(original, "_bench_peers_fix", False):
        return

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = original(self, cpu, sagemaker_dp, backend)
        launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if found is None and launched:
            return "gloo", DistributedType.MULTI_CPU
        return found, kind

    _prepare_backend._bench_peers_fix = True
    S.PartialState._prepare_backend = _prepare_backend


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--strategy", choices=["zero3", "zero2", "ddp"], required=True)
    p.add_argument("--ds-config", default=None, help="resolved DeepSpeed JSON (zero3 / zero2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--no-fix", action="store_true", help="stock accelerate (shows the CPU defect)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.strategy != "ddp" and not args.no_fix:
        apply_cpu_fix()
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from pipeline.data.tasks import collate
    from pipeline.precision import weights_dtype
    from pipeline.training.engine import lr_lambda_factory

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = D.load_cfg(args.config, args.sets)
    micro = cfg.train.micro_batch_size
    ds_config = json.loads(Path(args.ds_config).read_text()) if args.strategy != "ddp" else None
    targs = TrainingArguments(
        output_dir=args.out_dir, per_device_train_batch_size=micro, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=cfg.train.lr, weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.grad_clip, warmup_steps=cfg.train.warmup_steps, optim="adamw_torch",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, remove_unused_columns=False,
        seed=cfg.train.seed, dataloader_num_workers=0, deepspeed=ds_config, use_cpu=args.strategy == "ddp",
        bf16=cfg.train.precision == "bf16", fp16=cfg.train.precision == "fp16",
        ddp_backend="gloo" if args.strategy == "ddp" else None,
    )
    state = targs.distributed_state
    D.say(f"[peer rank {rank}] accelerate: distributed_type {state.distributed_type}, num_processes "
          f"{state.num_processes}, process_index {state.process_index}, args.world_size {targs.world_size}")

    tok = D.tokenizer_of(cfg)
    ds = D.dataset_of(cfg, tok)
    steps = D.step_batches(len(ds), cfg.train.seed, world, micro, args.steps)
    # accelerate gives batch b to rank b % world: lay the examples out so batch (k-1)*world + r
    # is lora-tsd's rank-r micro-batch of step k.
    layout = [i for step in steps for mb in step for i in mb]

    class Ordered(torch.utils.data.Dataset):
        def __len__(self):
            return len(layout)

        def __getitem__(self, j):
            return {**ds[layout[j]], "ex_id": layout[j]}

    def collator(rows):
        batch = collate(rows, pad_id=tok.pad_token_id)
        batch["ex_id"] = torch.tensor([r["ex_id"] for r in rows])
        return batch

    torch.manual_seed(cfg.train.seed)
    model = AutoModelForCausalLM.from_pretrained(str(cfg.model.path), dtype=getattr(torch, weights_dtype(cfg)))
    m = cfg.method
    model = get_peft_model(model, LoraConfig(r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout,
                                             target_modules=list(m.targets), task_type="CAUSAL_LM"))
    seen = {"ids": [], "tokens": 0, "loss": float("nan")}

    class PeerTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            seen["ids"] += inputs.pop("ex_id").tolist()
            seen["tokens"] += int(inputs["attention_mask"].sum())
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            seen["loss"] = float((out[0] if return_outputs else out).detach())
            return out

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer if optimizer is not None else self.optimizer,
                    lr_lambda_factory(cfg, num_training_steps, {"phase_start": 0}))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    class StepClock(TrainerCallback):
        t0 = 0.0
        lr = float("nan")

        def on_train_begin(self, a, s, c, **kw):
            self.t0 = time.perf_counter()

        def on_step_begin(self, a, s, c, optimizer=None, **kw):
            self.lr = optimizer.param_groups[0]["lr"] if optimizer is not None else float("nan")

        def on_step_end(self, a, s, c, **kw):
            now = time.perf_counter()
            dt, self.t0 = now - self.t0, now
            D.say(f"[peer rank {rank}] step {s.global_step}/{args.steps} loss {seen['loss']:.4f} lr {self.lr:.2e} "
                  f"{seen['tokens'] / dt:.1f} tok/s {dt:.4f}s/step tokens {seen['tokens']} "
                  f"ids {','.join(map(str, seen['ids']))}")
            seen.update(ids=[], tokens=0)

    trainer = PeerTrainer(model=model, args=targs, train_dataset=Ordered(), data_collator=collator,
                          callbacks=[StepClock()])
    trainer.train()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    D.say(f"[peer rank {rank}] done")
    sys.stdout.flush()
    sys.stderr.flush()
    # DeepSpeed's gloo threads can abort the interpreter's teardown (pipeline.training.distributed)
    os._exit(0)


if __name__ == "__main__":
    main()
