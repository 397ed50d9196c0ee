"""At set-up, before the model is loaded: the base weights every rank is about to read are the same
on every node and, when resuming, the base the checkpoint was trained on (pipeline.fingerprint).

A lean checkpoint holds no frozen weight: the base, and LoRA-Init's residual, are rebuilt from
model.path. Another revision there, or one node's half-synced copy, would resume a silently
different model; this stops every rank instead, with one message (exit 2).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.fingerprint import Fingerprint, agree_on_base, check_same_base
from pipeline.logs import log
from pipeline.run_folder import BASE_FILE, recorded_base
from pipeline.training.nodes import Node
from pipeline.training.reshard import LAYOUT_FILE, Layout


def check_base(model_path: str, run_dir: Path, tag: str | None, saved: Layout | None,
               nodes: list[Node]) -> Fingerprint:
    """Every rank: this rank's fingerprint of model_path, after checking it against every other
    rank's (one all-gather) and, when resuming checkpoint `tag`, against the base the tag records
    (else the run folder's record). Raises BaseMismatchError (a ValueError: exit 2) on every rank."""
    hosts = {r: n.label() for n in nodes for r in n.ranks}
    base = agree_on_base(model_path, hosts)
    same = f"the same on all {len(hosts)} rank(s)" if len(hosts) > 1 else "this rank's copy"
    if tag is None:
        log(f"base weights {model_path}: fingerprint {base.digest} ({same}; {base.bytes_read / 2**20:.1f} MiB read)")
        return base
    recorded = Fingerprint.from_dict(saved.base) if saved is not None else None
    where = f"checkpoint {Path(run_dir) / 'checkpoints' / tag / LAYOUT_FILE}"
    if recorded is None:
        recorded, where = recorded_base(run_dir), str(Path(run_dir) / BASE_FILE)
    if check_same_base(model_path, recorded, base, where):
        log(f"base weights {model_path}: fingerprint {base.digest} ({same}), the base {where} records")
    else:
        log(f"WARNING: the base weights could not be checked: checkpoint {tag} was written before base fingerprints "
            f"were recorded; {model_path} (fingerprint {base.digest}, {same}) is taken as this run's base from here on")
    return base
