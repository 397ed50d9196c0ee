"""Start-up with a commonsense_170k-sized training set: time to the first optimizer step and host
memory per rank, the per-rank tokenization of before against the tokenized cache of
pipeline.data.training_set (cold: the cache is built; cached: it is found).

    python benchmarks/bench_data_start.py [--quick] [--rows 170000] [--repeats 3] [--before-rev c065ae0]
    python benchmarks/bench_data_start.py --epoch-memory     # after a run: one epoch read by 1, 2, 4 processes

A generated LLM-Adapters file (one JSON list, `--rows` rows in the instruction layouts of the
commonsense tasks (true/false, solution, answer, ending, option), made-up words, seeded; 99 MB at
170k rows) trains a random-init tiny LLaMA (hidden 32, 2 layers; its word-level tokenizer knows
the file's words) with LoRA on 2 CPU ranks under torchrun, through the real per-rank entry (`pipeline.launch.worker`: preflight, then
training.loop.train), cutoff_len 256, train_on_inputs true (LLM-Adapters' defaults), micro batch 4,
ZeRO-3, MLflow off. The model is tiny on purpose: what is left is the start-up itself.

Variants, each a fresh torchrun, interleaved in a rotating order, medians over `--repeats`:
  before   training.loop's dataset is the loader of `--before-rev` (`git show REV:pipeline/data/
           loader.py` into a temporary module): every rank tokenizes every row, one at a time,
           into Python lists
  cold     the current code with an empty cache folder: local rank 0 tokenizes in batches into
           the cache, rank 1 waits, both map it
  cached   the current code, the cache already there
  floor    the current code, cached, on the first 64 rows of the file: the start-up that is not
           the data's (imports, process group, model, DeepSpeed), which no data path can beat
Each rank records, when its first optimizer step returns: seconds since torchrun was started, its
CPU time (user + system, all its threads: less at the mercy of other work on the machine), its
peak resident set (VmHWM), and at that moment its resident set split into anonymous memory (its
own) and file-backed pages (the mapped Arrow cache among them, shared by the ranks of a node
through the page cache) and its proportional set size (PSS: shared pages divided among the
processes mapping them). Also the seconds its preflight took (it parses every training row, on every
rank), the seconds its dataset took and the resident set growth over that
call. Then both ranks leave (the rest of the run is not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BEFORE_REV = "c065ae0"  # the last commit whose training loop tokenized per rank (pipeline/data/loader.py)
VARIANTS = ("before", "cold", "cached", "floor")
FLOOR_ROWS = 64

# The instruction layouts of commonsense_170k's tasks (LLM-Adapters' files), with made-up words.
TEMPLATES = [
    ("Please answer the following question with true or false, question: {q}?\n\nAnswer format: true/false",
     ["true", "false"]),
    ("Please choose the correct solution to the question: {q}\n\nSolution1: {a}\n\nSolution2: {b}\n\n"
     "Answer format: solution1/solution2", ["solution1", "solution2"]),
    ("Please choose the correct answer to the question: {q}\n\nAnswer1: {a} Answer2: {b} Answer3: {c}\n\n"
     "Answer format: answer1/answer2/answer3", ["answer1", "answer2", "answer3"]),
    ("Please choose the correct ending to complete the given sentence: {q}\n\nEnding1: {a} Ending2: {b} "
     "Ending3: {c} Ending4: {d}\n\nAnswer format: ending1/ending2/ending3/ending4",
     ["ending1", "ending2", "ending3", "ending4"]),
    ("Please choose the correct answer to fill in the blank to complete the given sentence: {q}\n\n"
     "Option1: {a} Option2: {b} Answer format: option1/option2", ["option1", "option2"]),
    ("Please choose the correct answer to the question: {q}\n\nAnswer1: {a} Answer2: {b} Answer3: {c} "
     "Answer4: {d}\n\nAnswer format: answer1/answer2/answer3/answer4", ["answer1", "answer2", "answer3", "answer4"]),
]


def make_data(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(3000)] + "the a of to in is was that he she it for on with as by".split()

    def sent(n):
        return " ".join(rng.choice(words) for _ in range(n))

    out = []
    for i in range(rows):
        template, answers = TEMPLATES[i % len(TEMPLATES)]
        answer = rng.choice(answers)
        out.append({"instruction": template.format(q=sent(rng.randint(10, 60)), a=sent(8), b=sent(8), c=sent(8),
                                                   d=sent(12)),
                    "input": "", "output": f"the correct answer is {answer}", "answer": answer})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=4))
    tmp.rename(path)


def make_model(path: Path, data: Path) -> None:
    from pipeline.data.synthetic import make_model_dir
    from pipeline.data.tasks import generate_prompt

    rows = json.loads(data.read_text())[:3000]
    make_model_dir(path, texts=[generate_prompt(r["instruction"], r["input"], r["output"]) for r in rows])


def write_config(work: Path, name: str, data: Path) -> Path:
    import yaml

    cfg = {
        "name": name,
        "output_dir": str(work / "runs"),
        "model": {"path": str(work / "model")},
        "data": {"train": str(data), "cutoff_len": 256, "train_on_inputs": True},
        "method": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
        "train": {"lr": 1e-3, "warmup_steps": 0, "micro_batch_size": 4, "max_steps": 1},
        "deepspeed": {"config": str(ROOT / "configs/deepspeed/zero3.json")},
        "workers": {"num_workers": 2, "cpus_per_worker": 1},
        "tracking": {"offline": True},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------- one rank (--worker)
def _memory() -> dict:
    status = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            status[key] = int(value.split()[0]) / 1024
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Pss:"):
            status["Pss"] = int(line.split()[1]) / 1024
    return status


def worker(variant: str, config: str, out: Path, before_module: str | None) -> int:
    """One rank: the real worker entry, instrumented (run by torchrun)."""
    t0 = float(os.environ["BENCH_T0"])
    rank = int(os.environ["RANK"])
    record: dict = {"variant": variant, "rank": rank}
    import deepspeed.runtime.engine as ds_engine
    import torch.distributed as dist

    import pipeline.training.session as loop  # set-up builds the training set

    current = loop.training_dataset
    if variant == "before":
        import importlib.util

        spec = importlib.util.spec_from_file_location("before_loader", before_module)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)

        def make(cfg, tokenizer, classes, rank, nodes):
            return old.TokenizedTasks(cfg.data, tokenizer)
    else:
        make = current

    def timed(cfg, tokenizer, classes, rank, nodes):
        before = _memory()
        t = time.time()
        ds = make(cfg, tokenizer, classes, rank, nodes)
        record["dataset_s"] = time.time() - t
        record["dataset_rss_growth_mb"] = _memory()["VmRSS"] - before["VmRSS"]
        record["rows"] = len(ds)
        return ds

    loop.training_dataset = timed
    import pipeline.launch.worker as launch_worker

    checks = launch_worker.preflight

    def timed_preflight(*a, **k):
        t = time.time()
        checks(*a, **k)
        record["preflight_s"] = time.time() - t  # it parses every training row, on every rank

    launch_worker.preflight = timed_preflight
    step = ds_engine.DeepSpeedEngine.step

    def first_step(self, *a, **k):
        result = step(self, *a, **k)
        if self.global_steps >= 1 and "first_step_s" not in record:
            record["first_step_s"] = time.time() - t0
            usage = resource.getrusage(resource.RUSAGE_SELF)
            record["cpu_s"] = usage.ru_utime + usage.ru_stime  # this rank's CPU time so far: less at the mercy of other load
            record.update(_memory())
            (out / f"{variant}-rank{rank}.json").write_text(json.dumps(record))
            dist.barrier()  # both ranks are past their step: leave now, the rest of the run is not measured
            os._exit(0)
        return result

    ds_engine.DeepSpeedEngine.step = first_step
    return launch_worker.main([config])


# ----------------------------------------------------------------------------- a whole epoch (--epoch-memory)
def _mapped(folder: str) -> dict:
    """Rss and Pss (MiB) of this process's mappings of files under `folder` (/proc/self/smaps)."""
    out = {"Rss": 0.0, "Pss": 0.0}
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's first line
            inside = len(head) >= 6 and head[5].startswith(folder)
        elif inside and head and head[0] in ("Rss:", "Pss:"):
            out[head[0][:-1]] += int(head[1]) / 1024
    return out


def epoch_reader(entry: str, rank: int, world: int, out: Path) -> None:
    """One of `world` processes reading its share of a whole epoch of the cached entry through the
    training loader (ArrowExamples + train_loader: sampler, __getitems__, collate); then it waits
    until every process is done, so that the shared pages are counted with all of them alive."""
    import torch

    from pipeline.data import cache
    from pipeline.data.loader import train_loader
    from pipeline.data.training_set import ArrowExamples

    torch.set_num_threads(1)
    before = _memory()
    examples = ArrowExamples(cache.load(Path(entry)), labelled=False)
    loader = train_loader(examples, rank, world, seed=42, micro_batch_size=4, pad_id=0)
    loader.sampler.start_at(0, 0)
    t = time.time()
    tokens = sum(int(b["attention_mask"].sum()) for b in loader)
    seconds = time.time() - t
    (out / f"done{rank}").write_text("")
    while not (out / "go").exists():
        time.sleep(0.2)
    after = _memory()
    (out / f"epoch{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "tokens": tokens, "seconds": seconds,
                                                       "before": before, "after": after, "entry": _mapped(entry)}))
    (out / f"measured{rank}").write_text("")
    while len(list(out.glob("measured*"))) < world:  # nobody unmaps before every process has measured
        time.sleep(0.2)


def epoch_memory(work: Path, worlds=(1, 2, 4)) -> list[dict]:
    entries = sorted((work / "runs" / "data-cache").glob("*/meta.json"))
    if not entries:
        raise SystemExit("--epoch-memory needs the cache of a previous run in --work")
    entry = entries[-1].parent
    size = sum(f.stat().st_size for f in entry.glob("part-*.arrow")) / 2**20
    print(f"# a whole epoch read from {entry} ({size:.0f} MiB of Arrow files) by 1, 2 and 4 concurrent processes")
    rows = []
    for world in worlds:
        out = work / f"epoch{world}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, __file__, "--epoch-reader", str(entry), str(r), str(world), str(out)],
                                  cwd=ROOT, env=env) for r in range(world)]
        while len(list(out.glob("done*"))) < world and all(p.poll() is None for p in procs):
            time.sleep(0.5)
        (out / "go").write_text("")
        for p in procs:
            p.wait()
        got = [json.loads((out / f"epoch{r}.json").read_text()) for r in range(world)]
        for g in got:
            a, b = g["after"], g["before"]
            rows.append([world, g["rank"], f"{g['seconds']:.1f}", f"{a['RssAnon'] - b['RssAnon']:.0f}",
                         f"{g['entry']['Rss']:.0f}", f"{g['entry']['Pss']:.0f}"])
        node = sum(g["entry"]["Pss"] for g in got)
        print(f"# {world} process(es): the entry's pages, PSS summed over the processes: {node:.0f} MiB", flush=True)
    from benchmarks._common import table

    print(table(["processes", "rank", "epoch s", "own (anonymous) memory growth MiB", "entry mapped, RSS MiB",
                 "entry mapped, PSS MiB"], rows))
    return rows


# ----------------------------------------------------------------------------- the driver
def others() -> list[str]:
    """The busiest processes that are not this benchmark's (what else ran)."""
    ps = subprocess.run(["ps", "-eo", "pcpu,rss,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    lines = []
    for line in ps.splitlines()[1:]:
        if "bench_data_start" in line or line.split()[0] == "0.0":
            continue
        lines.append(" ".join(line.split()[:2]) + " " + " ".join(line.split()[2:])[:110])
    return lines[:6]


def run(variant: str, work: Path, rep: int, before_module: Path) -> dict:
    cache = work / "runs" / "data-cache"
    if variant == "cold":
        shutil.rmtree(cache, ignore_errors=True)
    config = write_config(work, f"{variant}-{rep}", work / ("floor.json" if variant == "floor" else "train.json"))
    out = work / "out"
    out.mkdir(exist_ok=True)
    for f in out.glob(f"{variant}-rank*.json"):
        f.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "BENCH_T0": repr(time.time())}
    load0 = os.getloadavg()[0]
    busy = others()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "--worker",
           variant, str(config), str(out), str(before_module)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob(f"{variant}-rank*.json"))]
    if len(ranks) != 2:
        raise SystemExit(f"{variant} rep {rep} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {"variant": variant, "rep": rep, "ranks": ranks, "load1_before": load0, "load1_after": os.getloadavg()[0],
            "others": busy}


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5]))
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--epoch-reader":
        return epoch_reader(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=None, help="170000 (--quick: 20000)")
    ap.add_argument("--repeats", type=int, default=None, help="3 (--quick: 1)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--before-rev", default=BEFORE_REV)
    ap.add_argument("--work", default="/tmp/tsd-bench-data-start", help="kept between invocations (the data file)")
    ap.add_argument("--json", default=None, help="also write every measurement here")
    ap.add_argument("--epoch-memory", action="store_true",
                    help="only: read a whole epoch of the cache left in --work by 1, 2 and 4 concurrent processes")
    args = ap.parse_args(argv)
    if args.epoch_memory:
        epoch_memory(Path(args.work))
        return
    args.rows = args.rows or (20_000 if args.quick else 170_000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    from benchmarks._common import machine_info, table

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.json"
    marker = work / "rows"
    if not data.exists() or not marker.exists() or marker.read_text() != str(args.rows):
        t = time.time()
        make_data(data, args.rows)
        marker.write_text(str(args.rows))
        print(f"# generated {args.rows} rows ({data.stat().st_size / 1e6:.0f} MB) in {time.time() - t:.0f}s", flush=True)
    if not (work / "model" / "config.json").exists():
        make_model(work / "model", data)
    (work / "floor.json").write_text(json.dumps(json.loads(data.read_text())[:FLOOR_ROWS]))
    before_module = work / "before_loader.py"
    before_module.write_text(subprocess.run(["git", "show", f"{args.before_rev}:pipeline/data/loader.py"], cwd=ROOT,
                                            capture_output=True, text=True, check=True).stdout)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--short", "pipeline"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    info = machine_info()
    print(f"# benchmark bench_data_start: {' '.join(sys.argv[1:])}")
    print(f"# machine: {info}; code: HEAD {head}{' + uncommitted changes in pipeline/' if dirty else ''}; "
          f"before = {args.before_rev}:pipeline/data/loader.py", flush=True)
    print("# warm-up (untimed): a cold start, which also compiles/loads DeepSpeed's CPU op and fills the page cache",
          flush=True)
    run("cold", work, 0, before_module)
    run("floor", work, 0, before_module)
    results = []
    for rep in range(1, args.repeats + 1):
        order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
        for variant in order:
            r = run(variant, work, rep, before_module)
            results.append(r)
            f = lambda k: "/".join(f"{x[k]:.1f}" for x in r["ranks"])  # noqa: E731
            print(f"rep {rep} {variant:6s}: first step {f('first_step_s')} s, CPU {f('cpu_s')} s, preflight {f('preflight_s')} s, "
                  f"dataset {f('dataset_s')} s, "
                  f"peak RSS {f('VmHWM')} MB, anon {f('RssAnon')} MB, file {f('RssFile')} MB, PSS {f('Pss')} MB "
                  f"(ranks 0/1; load {r['load1_before']:.1f} -> {r['load1_after']:.1f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "head": head, "results": results}, indent=1))

    def med(variant, key, agg=max):
        return statistics.median(agg(x[key] for x in r["ranks"]) for r in results if r["variant"] == variant)

    rows = []
    for v in VARIANTS:
        rows.append([v, f"{med(v, 'first_step_s'):.1f}", f"{med(v, 'cpu_s'):.1f}", f"{med(v, 'preflight_s'):.1f}",
                     f"{med(v, 'dataset_s'):.1f}",
                     f"{med(v, 'dataset_s', min):.1f}", f"{med(v, 'VmHWM'):.0f}", f"{med(v, 'RssAnon'):.0f}",
                     f"{med(v, 'RssFile'):.0f}", f"{med(v, 'Pss'):.0f}", f"{med(v, 'dataset_rss_growth_mb'):.0f}"])
    print(table(["variant", "first step s (slower rank)", "CPU s to it (busier rank)", "preflight s", "dataset s (slower)", "dataset s (faster)",
                 "peak RSS MB", "anon MB", "file MB", "PSS MB", "RSS growth in dataset MB"], rows))
    print("# memory columns: the larger of the two ranks, at the first step; medians over the repeats")
    load = os.getloadavg()
    print(f"# load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (nproc {os.cpu_count()})")
    def per_rep(variant):  # before / variant within each repeat (the same stretch of machine load)
        by = {(r["variant"], r["rep"]): max(x["first_step_s"] for x in r["ranks"]) for r in results}
        return [by[("before", k)] / by[(variant, k)] for k in range(1, args.repeats + 1)]

    for v in ("cold", "cached", "floor"):
        print(f"# before / {v} per repeat: " + ", ".join(f"{x:.2f}" for x in per_rep(v)) +
              f" (median {statistics.median(per_rep(v)):.2f})")
    print(f"cold_start_speedup={med('before', 'first_step_s') / med('cold', 'first_step_s'):.4f}")
    print(f"# CPU seconds to the first step, before / cached: {med('before', 'cpu_s') / med('cached', 'cpu_s'):.2f}, "
          f"before / cold: {med('before', 'cpu_s') / med('cold', 'cpu_s'):.2f} (busier rank)")
    print(f"cached_start_speedup={med('before', 'first_step_s') / med('cached', 'first_step_s'):.4f}")


if __name__ == "__main__":
    main()
