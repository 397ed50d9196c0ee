"""How every process of a run reports: one stdlib logger (`tsd`), one line format, rank 0 only.

    [tsd rank 1] checkpoint step4 written to runs/demo/checkpoints     (a training/eval rank)
    [tsd driver] MLflow run 3f2c... in experiment 'lora-tsd'             (the Ray driver)
    [tsd prepare] fetched SmolLM2-135M                                    (other commands)

Lines of ranks other than 0 are dropped, unless the call asks for every rank (`all_ranks=True`:
a rank's own error, a per-rank timing) or TSD_LOG_ALL_RANKS=1 is set. Lines go to stderr, and
this logger does not hand them on to the root logger: Ray Train puts a console handler there,
which would print each line a second time in the driver's output.

Dependencies' deprecation notices (torch.distributed's on every ZeRO-3 collective DeepSpeed
makes, transformers', peft's) say nothing a lora-tsd user can act on and buried the run's own
lines; `setup_logging` filters them once per process. Set TSD_SHOW_DEPENDENCY_WARNINGS=1 to
see them.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LOGGER = logging.getLogger("tsd")
_DEPENDENCIES = r"(torch|transformers|deepspeed|peft|accelerate|ray|mlflow)(\.|$)"
_state = {"role": "", "configured": False}


def _rank() -> int | None:
    """This process's rank once torch.distributed is up, else None (driver, CLI, before init).
    Looked up in sys.modules: logging never imports torch."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return None


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = _rank()
        record.who = f" rank {rank}" if rank is not None else (f" {_state['role']}" if _state["role"] else "")
        return rank in (None, 0) or getattr(record, "all_ranks", False) or os.environ.get("TSD_LOG_ALL_RANKS") == "1"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest and Ray replace it after start-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(role: str | None = None) -> None:
    """Configure the `tsd` logger (once) and filter dependency warnings; `role` names a process
    that is not a rank ("driver", "prepare"). Safe to call again."""
    if role is not None:
        _state["role"] = role
    if _state["configured"]:
        return
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("[tsd%(who)s] %(message)s"))
    handler.addFilter(_RankFilter())
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    if os.environ.get("TSD_SHOW_DEPENDENCY_WARNINGS") != "1":
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=_DEPENDENCIES)
    _state["configured"] = True


def log(msg: str, all_ranks: bool = False) -> None:
    """One line from rank 0 (or from every rank with `all_ranks`)."""
    setup_logging()
    LOGGER.info(msg, extra={"all_ranks": all_ranks})
