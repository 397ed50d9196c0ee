"""Plain PEFT peer of bench_peers.py: one process, `--threads` torch threads, no DeepSpeed.

    python benchmarks/peers/peft_loop.py CONFIG --steps N --threads 2 [--set KEY=VALUE ...]

peft.get_peft_model (LoRA r, alpha, dropout, targets of the config's method section) on the
model in model.dtype, torch.optim.AdamW (train.lr, train.weight_decay), the project's schedule
(pipeline.training.engine.lr_lambda_factory: warmup then linear decay over N steps), gradient
clipping at train.grad_clip as DeepSpeed applies it in lora-tsd, and each optimizer step one
batch of the 4 examples lora-tsd's step uses (benchmarks/peers/_data.py), padded together.
Per step it prints on stderr:
  [peer rank 0] step k/N loss L lr X T tok/s S s/step tokens T ids i,j,...
with the step time from the end of the previous step (as lora-tsd's loop times a step).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data as D  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=4)
    args = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.data.tasks import collate
    from pipeline.precision import weights_dtype
    from pipeline.training.engine import lr_lambda_factory

    torch.set_num_threads(args.threads)
    cfg = D.load_cfg(args.config, args.sets)
    tok = D.tokenizer_of(cfg)
    ds = D.dataset_of(cfg, tok)
    steps = D.step_batches(len(ds), cfg.train.seed, 1, args.global_batch, args.steps)
    torch.manual_seed(cfg.train.seed)
    model = AutoModelForCausalLM.from_pretrained(str(cfg.model.path), dtype=getattr(torch, weights_dtype(cfg)))
    m = cfg.method
    model = get_peft_model(model, LoraConfig(r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout,
                                             target_modules=list(m.targets), task_type="CAUSAL_LM"))
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_factory(cfg, args.steps, {"phase_start": 0}))
    t0 = time.perf_counter()
    for k, step in enumerate(steps, start=1):
        ids = step[0]
        batch = collate([ds[i] for i in ids], pad_id=tok.pad_token_id)
        lr_now = opt.param_groups[0]["lr"]
        loss = model(**batch).loss
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens = int(batch["attention_mask"].sum())
        dt = time.perf_counter() - t0
        D.say(f"[peer rank 0] step {k}/{args.steps} loss {float(loss):.4f} lr {lr_now:.2e} {tokens / dt:.1f} tok/s "
              f"{dt:.4f}s/step tokens {tokens} ids {','.join(map(str, ids))}")
        t0 = time.perf_counter()


if __name__ == "__main__":
    main()
