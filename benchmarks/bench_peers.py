"""Benchmark 8 (issue 15): lora-tsd's training throughput against its peers, same model, same data,
same global batch.

  peft          plain PEFT in one process, 2 torch threads: get_peft_model + torch AdamW + the
                project's schedule, one batch of the 4 examples per step (benchmarks/peers/peft_loop.py)
  tsd-<v>       lora-tsd itself: torchrun -m pipeline.launch.worker CONFIG --set method.method=lora
                ... one variant = a name, a world size and a list of --set overrides:
                  tsd-zero3     2 ranks x 1 thread, deepspeed.strategy=zero3
                  tsd-zero2     2 ranks x 1 thread, deepspeed.strategy=zero2
                  tsd-ddp       2 ranks x 1 thread, deepspeed.strategy=ddp
                  tsd-auto-1x2  1 rank  x 2 threads, deepspeed.strategy=auto, workers.threads_per_worker=2
                  tsd-auto-2x1  2 ranks x 1 thread, deepspeed.strategy=auto (the default config's split)
                more with --tsd-variant NAME=WORLD:KEY=VALUE;KEY=VALUE (threads per rank: 2 / WORLD)
  hf-<s>        Hugging Face Trainer + PEFT, 2 ranks x 1 thread under torchrun, per-device batch 2
                (benchmarks/peers/hf_trainer.py): hf-zero3 (DeepSpeed ZeRO-3), hf-zero2 (ZeRO-2),
                hf-ddp (the Trainer's own DDP on CPU, no DeepSpeed)

What is the same for all: the model (SmolLM2-135M-Instruct, model.dtype fp32), the demo's
Social-IQa file tokenized by the project's code (pipeline.data: data.limit, cutoff_len 160, the
harness's prompt and labels), LoRA r=8 alpha=16 dropout 0.05 on q,k,v,up,down, lr 2e-4 with the
project's schedule (warmup 4, linear decay over N), grad clip 1.0, and the global batch of each
optimizer step: the same 4 examples, in the project's order (its seeded DistributedSampler),
so the same non-pad tokens per step (checked: every system's per-step token counts against the
reference computed from the project's loader; exact for peft/hf, within the rounding of the
`tok/s` and `s/step` lora-tsd prints for tsd-*). 2 ranks use micro batch 2 each, 1 rank micro 4.
What differs is the system: its launch, engine, sharding, padding (each rank pads its own
micro-batch) and per-step overheads (logging, collectives).

The HF Trainer on a CPU-only machine trains every rank on the same batches: accelerate finds no
distributed backend without an accelerator unless told cpu=True, which would switch DeepSpeed
off, so every rank believes it is the only process and the dataloader does not shard. The
MINIMAL fix (benchmarks/peers/hf_trainer.py, `apply_cpu_fix`): wrap
`accelerate.state.PartialState._prepare_backend` to answer ("gloo", MULTI_CPU) under a launcher
when it found no backend; accelerate then keeps DeepSpeed and records the real world size and
rank, and shards. `--no-hf-fix` runs stock accelerate (the driver then reports the defect
instead of failing). The other known defect, an empty adapter saved under ZeRO-3 (the
project's zero3.json does not gather 16-bit weights on save), does not affect throughput: the
HF runs save nothing. HF's DeepSpeed configs are the project's configs/deepspeed/zero3.json
with its "auto" values resolved as pipeline.training.engine.deepspeed_config does for a model
that fits (DeepSpeed defaults: reduce_bucket_size 5e7, stage3_prefetch_bucket_size 5e7,
stage3_max_live_parameters 1e9, stage3_max_reuse_distance 1e9; stage3_param_persistence_threshold
0 as in the file; micro batch, grad accum 1, clipping 1.0, no bf16/fp16); ZeRO-2: the same file
at stage 2 without its stage3_* keys (as the project derives its zero2). Written into the JSON.

Per run: the per-step lines on stderr (rank 0's `[tsd rank 0] step k/N ... tok/s ...s/step`, the
peers' `[peer rank R] step k/N ... tokens T ids ...`), read with arrival timestamps;
  s/step, tok/s:  median over the steady steps k > --skip (default 5: steps 6..N) of each step's
                  own time (the loop's timer: previous step's end to this step's end) and of
                  (global non-pad tokens of the step) / (that time);
  wall tok/s:     the steady steps' tokens over the wall-clock time between rank 0's lines of
                  step --skip and step N (includes everything between steps);
  start-up:       launch -> start of step 1 (arrival of step 1's line minus step 1's time);
  peak RSS:       VmHWM of every rank process (polled from /proc every 0.2 s; ranks are the
                  processes with RANK in their environment, else the single process), and the
                  peak of the whole process tree's summed RSS (launcher included);
  total wall:     launch -> exit (lora-tsd also writes its final checkpoint and adapter; the
                  peers save nothing: compare start-up and steady figures, not this).
Systems run in rotated order each round (`--rounds`, default 3); the table has medians with
their min-max over rounds, and each system's per-round tok/s ratio to plain PEFT (median,
min-max). Results: a markdown table on stdout and a JSON file (--out).

  python benchmarks/bench_peers.py --quick                     # tiny random LLaMA, 8 steps, 1 round
  python benchmarks/bench_peers.py                             # SmolLM2-135M, 20 steps, 3 rounds
  python benchmarks/bench_peers.py --only peft,tsd-zero3,hf-zero3 --steps 8 --rounds 1

Master ports 29700-29799. Every run is its own process group, killed when it ends or fails.
CPU only: children get CUDA_VISIBLE_DEVICES="" (the HF fix is for a machine without accelerator).
Headline: tsd_best_over_peft=<the fastest lora-tsd variant's steady tok/s / plain PEFT's>
(median of the per-round ratios), after `<system>_over_peft=` and `tsd_<s>_over_hf_<s>=` lines.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
import _data as D  # noqa: E402

PEERS = Path(__file__).resolve().parent / "peers"
TSD_RE = re.compile(r"\[tsd rank 0\] step (\d+)/(\d+) loss (\S+) lr (\S+) (\S+) tok/s (\S+)s/step")
PEER_RE = re.compile(r"\[peer rank (\d+)\] step (\d+)/(\d+) loss (\S+) lr (\S+) (\S+) tok/s (\S+)s/step "
                     r"tokens (\d+) ids ([\d,]+)")
PORT_BASE, PORT_SPAN = 29700, 100
GLOBAL_BATCH = 4
TOTAL_THREADS = 2


@dataclass
class System:
    name: str
    kind: str  # tsd | peft | hf
    world: int
    threads: int  # torch threads per rank
    sets: list[str] = field(default_factory=list)  # tsd: its --set overrides
    strategy: str | None = None  # hf: zero3 | zero2 | ddp
    legacy_ok: bool = False  # tsd: runs (as ZeRO-3) when the config has no deepspeed.strategy
    note: str = ""


CATALOGUE = {
    "peft": System("peft", "peft", 1, 2),
    "tsd-zero3": System("tsd-zero3", "tsd", 2, 1, ["deepspeed.strategy=zero3"], legacy_ok=True),
    "tsd-zero2": System("tsd-zero2", "tsd", 2, 1, ["deepspeed.strategy=zero2"]),
    "tsd-ddp": System("tsd-ddp", "tsd", 2, 1, ["deepspeed.strategy=ddp"]),
    "tsd-auto-1x2": System("tsd-auto-1x2", "tsd", 1, 2, ["deepspeed.strategy=auto", "workers.threads_per_worker=2"],
                           legacy_ok=True),
    "tsd-auto-2x1": System("tsd-auto-2x1", "tsd", 2, 1, ["deepspeed.strategy=auto"]),
    "hf-zero3": System("hf-zero3", "hf", 2, 1, strategy="zero3"),
    "hf-zero2": System("hf-zero2", "hf", 2, 1, strategy="zero2"),
    "hf-ddp": System("hf-ddp", "hf", 2, 1, strategy="ddp"),
}
DEFAULT = ["peft", "tsd-auto-2x1", "tsd-ddp", "tsd-zero2", "tsd-zero3", "tsd-auto-1x2", "hf-ddp", "hf-zero2", "hf-zero3"]


# ----------------------------------------------------------------------------- processes
_LIVE: set[int] = set()  # process groups of the runs in flight


def _kill_live(*_):
    for pgid in list(_LIVE):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _LIVE.discard(pgid)


def _on_signal(signum, frame):
    _kill_live()
    raise SystemExit(128 + signum)


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


class TreeMemory(threading.Thread):
    """Polls a process tree: each rank's VmHWM (its peak RSS), the tree's summed RSS."""

    def __init__(self, root: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.every, self.stop = root, every, threading.Event()
        self.hwm_kb: dict[int, int] = {}  # pid -> VmHWM
        self.rank_of: dict[int, int | None] = {}
        self.what: dict[int, str] = {}  # pid -> the start of its command line
        self.looks: dict[int, int] = {}
        self.parent: dict[int, int] = {}
        self.tree_peak_kb = 0

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.root)
        except psutil.Error:
            return
        while not self.stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for pr in procs:
                st = _status(pr.pid)
                if not st:
                    continue
                total += st.get("VmRSS", 0)
                # A child just forked still shows its parent's command and environment until it
                # execs: look again while no rank is known (a few polls).
                if self.rank_of.get(pr.pid) is None and self.looks.get(pr.pid, 0) < 25:
                    self.looks[pr.pid] = self.looks.get(pr.pid, 0) + 1
                    try:
                        self.parent[pr.pid] = pr.ppid()
                        self.what[pr.pid] = " ".join(Path(x).name if i == 0 else x for i, x in enumerate(pr.cmdline()[:4]))
                        env = pr.environ()
                        self.rank_of[pr.pid] = int(env["RANK"]) if "RANK" in env else None
                    except (psutil.Error, ValueError):
                        self.rank_of[pr.pid] = None
                self.hwm_kb[pr.pid] = max(self.hwm_kb.get(pr.pid, 0), st.get("VmHWM", 0))
            self.tree_peak_kb = max(self.tree_peak_kb, total)
            self.stop.wait(self.every)

    def per_rank_mb(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for pid, kb in self.hwm_kb.items():
            r = self.rank_of.get(pid)
            # a rank's own children (a compiler DeepSpeed starts) inherit RANK: not the rank
            if r is not None and self.rank_of.get(self.parent.get(pid, -1)) is None:
                out[r] = max(out.get(r, 0.0), kb / 1024.0)
        if not out:  # one process, no launcher: the root is rank 0
            out = {0: self.hwm_kb.get(self.root, 0) / 1024.0}
        return out


def run_group(cmd: list[str], env: dict, timeout: float) -> tuple[int, list[tuple[float, str]], float, TreeMemory]:
    """Run `cmd` in its own process group; (rc, timestamped output lines, launch time, memory)."""
    lines: list[tuple[float, str]] = []
    t_launch = time.time()
    proc = subprocess.Popen(cmd, cwd=C.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    _LIVE.add(proc.pid)
    mem = TreeMemory(proc.pid)
    mem.start()

    def reader():
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        lines.append((time.time(), f"# bench_peers: killed after {timeout:.0f}s"))
        rc = 124
    finally:
        try:  # ranks or helpers the launcher left behind
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _LIVE.discard(proc.pid)
        mem.stop.set()
    th.join(timeout=10)
    mem.join(timeout=5)
    return rc, lines, t_launch, mem


# ----------------------------------------------------------------------------- commands
def child_env(threads: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="",
               DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(C.ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # The venv's tools first, as the project's tests run (tests/proc_group.child_env): DeepSpeed
    # builds its CPU shared-memory op with the first `ninja` on PATH, and two ninja versions
    # (the venv's 1.13, log v7; the system's 1.11, log v5) sharing ~/.cache/torch_extensions
    # rebuild the op from scratch (20-60 s of start-up) every time the other one built it last.
    env["PATH"] = str(Path(C.PYTHON).parent) + os.pathsep + env.get("PATH", "")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def torchrun(world: int, port: int) -> list[str]:
    return [C.PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
            "--master_port", str(port)]


def overrides(sets: list[str]) -> list[str]:
    return [x for s in sets for x in ("--set", s)]


def command(s: System, args, run_dir: Path, port: int) -> list[str]:
    micro = GLOBAL_BATCH // s.world
    base = list(args.base_sets)
    if s.kind == "tsd":
        sets = base + ["method.method=lora", f"train.max_steps={args.steps}", f"output_dir={run_dir}",
                       f"name={s.name}", "tracking.offline=true", f"workers.num_workers={s.world}",
                       f"train.micro_batch_size={micro}", *s.sets]
        return torchrun(s.world, port) + ["-m", "pipeline.launch.worker", args.config, *overrides(sets)]
    if s.kind == "peft":
        return [C.PYTHON, str(PEERS / "peft_loop.py"), args.config, "--steps", str(args.steps), "--threads",
                str(s.threads), "--global-batch", str(GLOBAL_BATCH), *overrides(base)]
    if s.kind == "hf":
        cmd = torchrun(s.world, port) + [str(PEERS / "hf_trainer.py"), args.config, "--steps", str(args.steps),
                                         "--strategy", s.strategy, "--threads", str(s.threads),
                                         "--out-dir", str(run_dir), *overrides(base + [f"train.micro_batch_size={micro}"])]
        if s.strategy != "ddp":
            cmd += ["--ds-config", str(args.ds_files[s.strategy])]
        if args.no_hf_fix:
            cmd += ["--no-fix"]
        return cmd
    raise ValueError(s.kind)


def hf_ds_config(cfg, strategy: str, micro: int) -> dict:
    """The project's DeepSpeed JSON (deepspeed.config) with its "auto" values resolved as
    pipeline.training.engine.deepspeed_config does for a model that fits a rank (DeepSpeed's
    defaults), at the stage of `strategy` (zero2: without the stage3_* settings)."""
    ds = json.loads(Path(cfg.deepspeed.config).read_text())
    t = cfg.train
    for key, value in {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
                       "gradient_clipping": t.grad_clip}.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.pop("train_batch_size", None)
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = {"zero3": 3, "zero2": 2}[strategy]
    if strategy != "zero3":
        for key in [k for k in zero if k.startswith("stage3_") or k == "offload_param"]:
            del zero[key]
    limits = {"reduce_bucket_size": 50_000_000, "stage3_prefetch_bucket_size": 50_000_000,
              "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000}
    for key, value in limits.items():
        if zero.get(key, "auto") == "auto" and (strategy == "zero3" or not key.startswith("stage3_")):
            zero[key] = value
    if strategy == "zero3":
        zero.setdefault("stage3_param_persistence_threshold", 0)
    for key, on in (("bf16", t.precision == "bf16"), ("fp16", t.precision == "fp16")):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
    left = [k for k, v in {**ds, **zero}.items() if v == "auto"]
    if left:
        raise ValueError(f"{cfg.deepspeed.config}: 'auto' left unresolved for the HF Trainer: {left}")
    return ds


def check_variant(s: System, args) -> System | None:
    """A tsd variant whose overrides the current config accepts (the project may lack
    deepspeed.strategy: a legacy_ok variant then runs without it, as ZeRO-3); None: skip it.
    A strategy (auto included: a stage in the JSON wins over auto) that the DeepSpeed JSON's
    fixed stage contradicts (the demo's zero3.json: stage 3) gets a copy of that JSON with the
    stage "auto", as the project's preflight asks; the run's line names what lora-tsd chose."""
    if s.kind != "tsd":
        return s
    from pipeline.config import ConfigError

    try:
        cfg = D.load_cfg(args.config, list(args.base_sets) + s.sets)
    except ConfigError as e:
        if "strategy" in str(e) and s.legacy_ok:
            kept = [x for x in s.sets if not x.startswith("deepspeed.strategy=")]
            return System(s.name, s.kind, s.world, s.threads, kept, note="config has no deepspeed.strategy: ZeRO-3")
        print(f"# skipping {s.name}: the config refuses {s.sets}: {str(e).splitlines()[0]}", flush=True)
        return None
    stage_of = {"zero3": 3, "zero2": 2, "ddp": 0}
    strategy = getattr(cfg.deepspeed, "strategy", None)
    if strategy in stage_of or strategy == "auto":
        ds = json.loads(Path(cfg.deepspeed.config).read_text())
        stage = ds.get("zero_optimization", {}).get("stage", "auto")
        if isinstance(stage, int) and stage != stage_of.get(strategy):
            ds["zero_optimization"]["stage"] = "auto"
            copy = args.work / f"{Path(cfg.deepspeed.config).stem}-stage-auto.json"
            copy.write_text(json.dumps(ds, indent=1))
            return System(s.name, s.kind, s.world, s.threads, s.sets + [f"deepspeed.config={copy}"],
                          note=f"{Path(cfg.deepspeed.config).name} with its stage {stage} set to \"auto\"")
    return s


# ----------------------------------------------------------------------------- one run
def run_one(s: System, args, idx: int, rnd: int) -> dict:
    run_dir = args.work / "runs" / f"{s.name}-{idx}"
    run_dir.mkdir(parents=True, exist_ok=True)
    port = PORT_BASE + idx % PORT_SPAN
    cmd = command(s, args, run_dir, port)
    rc, lines, t_launch, mem = run_group(cmd, child_env(s.threads), args.timeout)
    t_end = max([t for t, _ in lines] + [time.time()])
    wall = t_end - t_launch
    log = run_dir.parent / f"{s.name}-{idx}.log"
    log.write_text("\n".join(l for _, l in lines) + "\n")
    if rc != 0:
        tail = "\n".join(l for _, l in lines[-40:])
        raise RuntimeError(f"{s.name} failed (rc {rc}), log {log}:\n{' '.join(cmd)}\n{tail}")

    ref = args.ref[s.world]
    steps: dict[int, dict] = {}
    problems: list[str] = []
    for t, line in lines:
        if s.kind == "tsd":
            m = TSD_RE.search(line)
            if m and int(m.group(1)) not in steps:
                tps, sec = float(m.group(5)), float(m.group(6))
                steps[int(m.group(1))] = {"t": t, "loss": float(m.group(3)), "lr": float(m.group(4)), "s": sec,
                                          "tok_s_printed": tps,
                                          "tokens_printed": tps * sec, "tol": 0.5 * sec + 0.005 * tps + 1.0}
        else:
            for m in PEER_RE.finditer(line):  # ranks share the pipe: lines may meet
                r, k = int(m.group(1)), int(m.group(2))
                st = steps.setdefault(k, {"ranks": {}})
                st["ranks"][r] = {"t": t, "loss": float(m.group(4)), "lr": float(m.group(5)), "s": float(m.group(7)),
                                  "tokens": int(m.group(8)), "ids": [int(x) for x in m.group(9).split(",")]}
    missing = [k for k in range(1, args.steps + 1) if k not in steps]
    if missing:
        raise RuntimeError(f"{s.name}: no step line for steps {missing} (log {log})")
    hf_defect = None
    for k in range(1, args.steps + 1):
        st, want = steps[k], ref["tokens"][k - 1]
        if s.kind == "tsd":
            st["tokens"] = want
            if abs(st["tokens_printed"] - want) > st["tol"]:
                problems.append(f"step {k}: {st['tokens_printed']:.1f} tokens (tok/s x s/step) vs {want} expected")
            # lora-tsd prints s/step to 0.01 s and tok/s to 1 tok/s: with the tokens known, the
            # step time from tok/s is the finer one (always, once a step has > 100 s^2 tokens).
            tps = st["tok_s_printed"]
            st["s_printed"] = st["s"]
            if tps > 0 and 0.5 / tps < 0.005 / st["s"]:
                st["s"] = want / tps
            continue
        ranks = st["ranks"]
        if sorted(ranks) != list(range(s.world)):
            problems.append(f"step {k}: lines of ranks {sorted(ranks)}, expected {s.world}")
        r0 = ranks.get(0) or next(iter(ranks.values()))
        st.update(t=r0["t"], s=r0["s"], lr=r0["lr"], tokens=sum(x["tokens"] for x in ranks.values()),
                  loss=sum(x["loss"] for x in ranks.values()) / len(ranks), ids={r: x["ids"] for r, x in ranks.items()})
        want_ids = ref["batches"][k - 1]  # rank r's micro-batch (world 1: the whole global batch)
        got = [ranks[r]["ids"] if r in ranks else [] for r in range(s.world)]
        if got != want_ids:
            if s.kind == "hf" and s.world > 1 and all(g == got[0] for g in got):
                hf_defect = hf_defect or f"step {k}: every rank trained on the same examples {got[0]}"
            problems.append(f"step {k}: ranks trained on {got}, expected {want_ids}")
        if st["tokens"] != want:
            problems.append(f"step {k}: {st['tokens']} non-pad tokens, expected {want}")
    if problems and not (args.no_hf_fix and s.kind == "hf"):
        raise RuntimeError(f"{s.name}: not the same data as lora-tsd (log {log}):\n  " + "\n  ".join(problems[:8]))

    steady = [k for k in range(1, args.steps + 1) if k > args.skip]
    first = steps[1]
    start_of_step1 = first["t"] - first["s"]
    step_s = [steps[k]["s"] for k in steady]
    tok_s = [steps[k]["tokens"] / steps[k]["s"] for k in steady]
    span = steps[steady[-1]]["t"] - steps[steady[0] - 1]["t"] if steady and steady[0] > 1 else float("nan")
    per_rank = mem.per_rank_mb()
    return {
        "system": s.name, "round": rnd, "index": idx, "command": cmd, "log": str(log),
        "startup_s": start_of_step1 - t_launch,
        "step_s_median": C.med(step_s), "tok_s_median": C.med(tok_s),
        "wall_tok_s": sum(steps[k]["tokens"] for k in steady) / span if span == span and span > 0 else float("nan"),
        "wall_s": wall,
        "peak_rss_mb_per_rank": {str(r): round(v, 1) for r, v in sorted(per_rank.items())},
        "peak_rss_mb_max_rank": max(per_rank.values()) if per_rank else float("nan"),
        "tree_peak_rss_mb": mem.tree_peak_kb / 1024.0,
        "processes": [{"pid": pid, "rank": mem.rank_of.get(pid), "cmd": mem.what.get(pid, "?"), "peak_rss_mb": round(kb / 1024, 1)}
                      for pid, kb in sorted(mem.hwm_kb.items())],
        "steps": {str(k): {kk: v for kk, v in steps[k].items() if kk != "ranks"} for k in sorted(steps)},
        "step_time_s": [steps[k]["s"] for k in range(1, args.steps + 1)],
        "tokens": [steps[k]["tokens"] for k in range(1, args.steps + 1)],
        "loss": [steps[k]["loss"] for k in range(1, args.steps + 1)],
        "data_problems": problems, "hf_defect": hf_defect,
        "tsd_strategy": next((l.split("] ", 1)[1] for _, l in lines if l.startswith("[tsd rank 0] strategy ")), None),
        "accelerate_state": sorted({l for _, l in lines if l.startswith("[peer rank") and "accelerate:" in l}),
    }


# ----------------------------------------------------------------------------- main
def spread(xs, digits=3) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{C.med(xs):.{digits}f} [{min(xs):.{digits}f}-{max(xs):.{digits}f}]"


def parse_variant(text: str) -> System:
    """NAME=WORLD:KEY=VALUE;KEY=VALUE -> a tsd variant (threads per rank: 2 / WORLD)."""
    name, rest = text.split("=", 1)
    world, _, sets = rest.partition(":")
    w = int(world)
    if w not in (1, 2, 4) or GLOBAL_BATCH % w:
        raise SystemExit(f"--tsd-variant {text}: world size must divide the global batch {GLOBAL_BATCH}")
    return System(name, "tsd", w, max(1, TOTAL_THREADS // w), [x for x in sets.split(";") if x])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random-init LLaMA, 8 steps, 1 round")
    p.add_argument("--only", default=None, help=f"systems, comma-separated (known: {', '.join(CATALOGUE)})")
    p.add_argument("--tsd-variant", action="append", default=[], metavar="NAME=WORLD:K=V;K=V",
                   help="an extra lora-tsd variant (added to the systems run)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20; quick 8)")
    p.add_argument("--skip", type=int, default=None, help="warm-up steps left out (default 5; quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="rounds over the systems, order rotated (default 3; quick 1)")
    p.add_argument("--config", default=str(C.ROOT / "configs/demo.yaml"))
    p.add_argument("--set", dest="extra", action="append", default=[], help="override for every system's config")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run (default 1800; quick 600)")
    p.add_argument("--no-hf-fix", action="store_true", help="stock accelerate for hf-zero*: report the CPU defect")
    p.add_argument("--out", default=None, help="JSON results (default docs/logs/bench_peers-<date>.json)")
    args = p.parse_args()

    signal.signal(signal.SIGTERM, _on_signal)
    import atexit

    atexit.register(_kill_live)
    args.work = C.work_dir("tsd-bench-peers-")
    args.steps = args.steps or (8 if args.quick else 20)
    args.skip = args.skip if args.skip is not None else (2 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.timeout = args.timeout or (600 if args.quick else 1800)
    if args.skip >= args.steps:
        raise SystemExit(f"--skip {args.skip} leaves no steady step of {args.steps}")
    args.base_sets = list(args.extra)
    if args.quick:
        from pipeline.data.synthetic import make_model_dir
        from pipeline.data.tasks import generate_prompt

        cfg0 = D.load_cfg(args.config, args.base_sets)
        from pipeline.data.tasks import load_many

        recs = load_many(cfg0.data.train)[: cfg0.data.limit or None]
        mdir = make_model_dir(args.work / "model", texts=[generate_prompt(r["instruction"], r.get("input"), r["output"])
                                                          for r in recs], hidden_size=64, intermediate_size=128)
        args.base_sets = [f"model.path={mdir}"] + args.base_sets

    names = args.only.split(",") if args.only else list(DEFAULT)
    extra = [parse_variant(v) for v in args.tsd_variant]
    known = {**CATALOGUE, **{v.name: v for v in extra}}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--only: unknown systems {unknown}; known: {', '.join(known)}")
    names += [v.name for v in extra if v.name not in names]
    systems = [v for n in names if (v := check_variant(known[n], args)) is not None]
    if not systems:
        raise SystemExit("no system to run")

    # The reference: every step's global batch and its non-pad tokens, from the project's loader.
    cfg = D.load_cfg(args.config, args.base_sets)
    tok = D.tokenizer_of(cfg)
    ds = D.dataset_of(cfg, tok)
    args.ref = {}
    for w in sorted({s.world for s in systems}):
        batches = D.step_batches(len(ds), cfg.train.seed, w, GLOBAL_BATCH // w, args.steps)
        args.ref[w] = {"batches": batches, "tokens": D.tokens_per_step(ds, batches)}
    if len(args.ref) > 1:
        toks = {w: r["tokens"] for w, r in args.ref.items()}
        assert len({tuple(t) for t in toks.values()}) == 1, f"global batches differ between world sizes: {toks}"
    ref_tokens = next(iter(args.ref.values()))["tokens"]
    args.ds_files, ds_configs = {}, {}
    for strat in ("zero3", "zero2"):
        if any(s.kind == "hf" and s.strategy == strat for s in systems):
            ds_configs[strat] = hf_ds_config(cfg, strat, GLOBAL_BATCH // 2)
            args.ds_files[strat] = args.work / f"hf_{strat}.json"
            args.ds_files[strat].write_text(json.dumps(ds_configs[strat], indent=1))

    C.print_header("peers", args)
    print(f"# config {args.config} {' '.join('--set ' + x for x in args.base_sets)}; {args.steps} steps, "
          f"steady = steps {args.skip + 1}..{args.steps}, {args.rounds} round(s), global batch {GLOBAL_BATCH}")
    print(f"# non-pad tokens per step (reference, project loader): {ref_tokens}")
    for s in systems:
        print(f"# {s.name}: {s.kind}, {s.world} rank(s) x {s.threads} thread(s)"
              + (f", --set {' '.join(s.sets)}" if s.sets else "") + (f", {s.strategy}" if s.strategy else "")
              + (f" ({s.note})" if s.note else ""), flush=True)

    if any(s.kind == "tsd" or s.strategy in ("zero3", "zero2") for s in systems):
        # DeepSpeed's CPU communication op is built (or found) before any timed run.
        t0 = time.time()
        rc, lines, _, _ = run_group([C.PYTHON, "-c", "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; "
                                     "B().load(verbose=False)"], child_env(1), args.timeout)
        if rc != 0:
            raise RuntimeError("building DeepSpeed's shm op failed:\n" + "\n".join(l for _, l in lines[-20:]))
        print(f"# DeepSpeed shm op ready in {time.time() - t0:.1f}s (a build when > ~10 s)", flush=True)

    results: dict[str, list[dict]] = {s.name: [] for s in systems}
    failed: dict[str, str] = {}
    idx = 0
    for rnd in range(args.rounds):
        order = systems[rnd % len(systems):] + systems[: rnd % len(systems)]
        for s in order:
            if s.name in failed:
                continue
            try:
                r = run_one(s, args, idx, rnd)
            except RuntimeError as e:
                failed[s.name] = str(e)
                print(f"# round {rnd} {s.name}: FAILED, left out of the next rounds: {str(e)[:3000]}", flush=True)
                continue
            finally:
                idx += 1
            results[s.name].append(r)
            steady_tokens = r["tokens"][args.skip:]
            print(f"# round {rnd} {s.name}: start-up {r['startup_s']:.1f}s, {r['step_s_median']:.3f} s/step, "
                  f"{r['tok_s_median']:.1f} tok/s (wall {r['wall_tok_s']:.1f}), peak RSS/rank "
                  f"{r['peak_rss_mb_per_rank']} MB, tree {r['tree_peak_rss_mb']:.0f} MB, wall {r['wall_s']:.1f}s; "
                  f"first steps s {[round(x, 2) for x in r['step_time_s'][:5]]}; loss "
                  f"{r['loss'][0]:.4f} -> {r['loss'][-1]:.4f}; steady tokens {steady_tokens}"
                  + (f"; DATA PROBLEMS: {r['data_problems'][:2]}" if r["data_problems"] else "")
                  + (f"; lora-tsd: {r['tsd_strategy']}" if r["tsd_strategy"] else ""), flush=True)
            if r["hf_defect"]:
                print(f"# {s.name}: HF CPU DEFECT (stock accelerate): {r['hf_defect']}", flush=True)

    # Steps compared: the same non-pad tokens per step in every system.
    for name, rs in results.items():
        for r in rs:
            if not r["data_problems"]:
                assert r["tokens"][args.skip:] == ref_tokens[args.skip:], (name, r["tokens"], ref_tokens)

    systems = [s for s in systems if results[s.name]]
    results = {n: rs for n, rs in results.items() if rs}
    if not systems:
        raise SystemExit(f"every system failed: {failed}")
    base = "peft" if "peft" in results else systems[0].name
    by_round = {name: {r["round"]: r for r in rs} for name, rs in results.items()}

    def ratios(name: str) -> list[float]:
        return [by_round[name][k]["tok_s_median"] / by_round[base][k]["tok_s_median"]
                for k in by_round[name] if k in by_round[base]]

    rows, summary = [], {}
    for s in systems:
        rs = results[s.name]
        rat = ratios(s.name)
        summary[s.name] = {
            "tok_s_median": C.med([r["tok_s_median"] for r in rs]),
            "step_s_median": C.med([r["step_s_median"] for r in rs]),
            f"over_{base}_median": C.med(rat), f"over_{base}_min": min(rat, default=float("nan")),
            f"over_{base}_max": max(rat, default=float("nan")),
            "startup_s_median": C.med([r["startup_s"] for r in rs]),
            "peak_rss_mb_max_rank_median": C.med([r["peak_rss_mb_max_rank"] for r in rs]),
            "tree_peak_rss_mb_median": C.med([r["tree_peak_rss_mb"] for r in rs]),
            "wall_s_median": C.med([r["wall_s"] for r in rs]),
        }
        rows.append([s.name, f"{s.world}x{s.threads}", spread([r["tok_s_median"] for r in rs], 1),
                     spread([r["step_s_median"] for r in rs], 3), spread(rat, 3),
                     spread([r["wall_tok_s"] for r in rs], 1), spread([r["startup_s"] for r in rs], 1),
                     spread([r["peak_rss_mb_max_rank"] for r in rs], 0), spread([r["tree_peak_rss_mb"] for r in rs], 0),
                     spread([r["wall_s"] for r in rs], 1), f"{rs[0]['loss'][0]:.4f} -> {rs[0]['loss'][-1]:.4f}"])
    print()
    print(C.table(["system", "ranks x threads", "tok/s (steady median) [min-max rounds]", "s/step",
                   f"tok/s / {base} (per round)", "wall-clock tok/s", "start-up s", "peak RSS/rank MB (max rank)",
                   "tree peak RSS MB", "total wall s", "loss step 1 -> N (round 0)"], rows))
    C.print_footer_load()

    out = Path(args.out) if args.out else C.ROOT / "docs/logs" / f"bench_peers-{_dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "bench_peers", "argv": sys.argv[1:], "machine": C.machine_info(), "config": args.config,
        "base_sets": args.base_sets, "steps": args.steps, "skip": args.skip, "rounds": args.rounds,
        "global_batch": GLOBAL_BATCH, "reference_tokens_per_step": ref_tokens,
        "systems": [asdict(s) for s in systems], "hf_deepspeed_configs": ds_configs, "hf_cpu_fix": not args.no_hf_fix,
        "summary": summary, "runs": results, "failed": failed,
    }, indent=1, default=str))
    print(f"# results written to {out}")

    key = lambda name: name.replace("-", "_")  # noqa: E731
    for s in systems:
        if s.name != base:
            print(f"{key(s.name)}_over_{key(base)}={summary[s.name][f'over_{base}_median']:.4f}")
    for strat in ("zero3", "zero2", "ddp"):
        a, b = f"tsd-{strat}", f"hf-{strat}"
        if a in by_round and b in by_round:
            rr = [by_round[a][k]["tok_s_median"] / by_round[b][k]["tok_s_median"] for k in by_round[a] if k in by_round[b]]
            print(f"tsd_{strat}_over_hf_{strat}={C.med(rr):.4f}")
    if failed:
        print(f"# FAILED systems: {', '.join(failed)} (see the JSON's 'failed')")
    tsd = [s.name for s in systems if s.kind == "tsd"]
    if base == "peft" and tsd:
        C.headline("tsd_best_over_peft", max(summary[n]["over_peft_median"] for n in tsd))
    else:
        other = [s.name for s in systems if s.name != base]
        if other:
            C.headline(f"{key(other[0])}_over_{key(base)}", summary[other[0]][f"over_{base}_median"])
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
