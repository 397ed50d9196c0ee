"""Per-rank entry point for the DeepSpeed launcher and torchrun.

    deepspeed --num_gpus 2 -m pipeline.launch.worker configs/demo.yaml      (CPU: --num_gpus 2 works)
    torchrun --standalone --nproc_per_node 2 -m pipeline.launch.worker configs/demo.yaml

Every rank runs the same `pipeline.training.loop.train` as under Ray. Without --run-id, rank 0 creates
the MLflow run itself (only rank 0 ever touches the tracking store).
"""

from __future__ import annotations

import argparse
import os
import sys

# First, before the imports that take seconds: it records the launcher's pid (pipeline.launch.lifeline).
from pipeline.launch.lifeline import die_with_launcher  # noqa: I001
from pipeline.config import ConfigError, load_config
from pipeline.errors import masked_traceback, user_message
from pipeline.training.distributed import before_exit, bind_device, end_process
from pipeline.paths import resolve_paths
from pipeline.launch.preflight import preflight
from pipeline.run_folder import check_rerun, finished_line
from pipeline.run_lock import RunLock
from pipeline.tracking.store import resolve_tracking_uri
from pipeline.training.loop import WorkerContext, main_entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.launch.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML run config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--fresh", action="store_true", help="start over when the run folder holds a run of this "
                   "config (tsd train --help)")
    p.add_argument("--run-id", default=None, help="MLflow run to log into (made by a driver)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the config's)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by `deepspeed`
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()  # kill -9 of torchrun / the DeepSpeed launcher must end this rank too
    args = parse_args(argv)
    # First, before the preflight or anything else can touch CUDA: this rank's GPU. The DeepSpeed
    # launcher passes --local_rank (and sets LOCAL_RANK); torchrun sets LOCAL_RANK.
    local_rank = args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
    bind_device(local_rank)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = resolve_paths(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:  # the same checks as `tsd train`, before the process group and DeepSpeed start; rank 0
        # alone reads every data row (a refusal there ends the others through their launcher)
        preflight(cfg, args.tracking_uri, world=world, ray=False, read_data=rank == 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launcher = "deepspeed" if args.local_rank is not None or "DEEPSPEED_ENVIRONMENT_NAME" in os.environ else "torchrun"
    # One writer per run folder: rank 0 holds its lock from here (before anything is written,
    # --fresh included) to its exit, a failed one's too (pipeline.run_lock).
    lock = RunLock(cfg.run_dir, what=f"{launcher} rank 0") if rank == 0 else None
    try:
        if lock is not None:
            lock.acquire()
            before_exit(lock.release)
        # Rank 0 alone clears the folder under --fresh; the others start training, which waits for
        # rank 0 at the process group's rendezvous, after the folder is cleared.
        state = check_rerun(cfg, fresh=args.fresh) if rank == 0 or not args.fresh else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        if lock is not None:
            lock.release()
        return 2
    try:
        if state is not None and state.kind == "finished":
            if rank == 0:
                print(finished_line(state, cfg), file=sys.stderr)
            return 0
        uri = resolve_tracking_uri(args.tracking_uri or cfg.tracking.uri, cfg.output_dir)
        main_entry(cfg, WorkerContext(run_id=args.run_id, tracking_uri=uri, launcher=launcher, local_rank=local_rank))
        return 0
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    # Not sys.exit: DeepSpeed keeps gloo's threads alive into the interpreter's teardown, which
    # can then abort a rank (pipeline.training.distributed); main_entry's own exits end the same way.
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    except Exception as e:  # a user error or a broken file or dead server: one line; else (a bug) the traceback
        message = user_message(e)  # pipeline.errors, as `tsd` does; secrets masked
        sys.stderr.write(f"error: {message}\n" if message is not None else masked_traceback(e))
        code = 2 if message is not None else 1
    end_process(code)
