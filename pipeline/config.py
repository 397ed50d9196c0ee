"""The typed run config: YAML in, nested dataclasses out, every key checked.

Unknown keys and wrong types are rejected with the key's dotted path and the file, e.g.
`configs/x.yaml: train.lr: expected a number, got 'fast'`. Relative paths in the file are
resolved against the current working directory when the run starts (so the same config works
locally and under `ray job submit --working-dir .`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.tracking.logger import mask_secrets, sqlite_path
from tsd.config import TSDConfig, TSDConfigError
from tsd.switch import switch_steps


class ConfigError(ValueError):
    """A run config is invalid; the message names the file, the key path and the problem."""


@dataclass
class ModelConfig:
    path: str = ""  # a local Hugging Face model folder (no hub on these machines)
    dtype: str = "float32"  # weights as loaded: float32 | bfloat16 | float16
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    # One or more LLM-Adapters JSON/JSONL files (instruction, input, output, answer), trained on
    # together: the paper's commonsense_170k is the eight tasks' training sets in one file.
    train: list[str] = field(default_factory=list)
    # Test sets evaluated after training (the paper's protocol), each "task=path" or a path whose
    # task is data.task; the task picks the answer format (e.g. social_i_qa).
    test: list[str] = field(default_factory=list)
    task: str | None = None
    cutoff_len: int = 256
    train_on_inputs: bool = True  # LLM-Adapters' default: the loss covers the prompt too
    limit: int | None = None  # use the first N training rows (demos, smoke tests)

    def test_sets(self) -> dict[str, str]:
        """{task: path} of the test sets, in the order given."""
        sets: dict[str, str] = {}
        for i, entry in enumerate(self.test):
            task, sep, path = entry.partition("=")
            if not sep:
                task, path = self.task, entry
                if not task:
                    raise ConfigError(
                        f"data.task: required with data.test entry {entry!r} (it picks the answer format, e.g. "
                        f"social_i_qa); or write the entry as task=path"
                    )
            if not task or not path:
                raise ConfigError(f"data.test[{i}]: {entry!r}: expected task=path or a path")
            if task in sets:
                raise ConfigError(f"data.test[{i}]: task {task!r} is given twice")
            sets[task] = path
        return sets


@dataclass
class MethodConfig(TSDConfig):
    """The method's settings (tsd.TSDConfig, validated there) plus where to cache SVDs."""

    svd_cache: str | None = None  # folder for cached decompositions, keyed by the base weights

    def tsd(self) -> TSDConfig:
        fields = {f.name for f in dataclasses.fields(TSDConfig)}
        return TSDConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


@dataclass
class TrainConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "linear"  # linear | cosine | constant (after warmup); restarts for LoRA-Init
    micro_batch_size: int = 4
    grad_accum: int = 1
    epochs: float = 3.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    seed: int = 42
    log_every: int = 1
    checkpoint_every: int | None = None  # optimizer steps; None: only at the end
    eval_max_new_tokens: int = 32
    eval_num_beams: int = 4
    eval_limit: int | None = None  # the first N rows of each test set
    eval_batch_size: int = 1  # rows generated together (left-padded); the paper's harness uses 1


@dataclass
class DeepSpeedConfig:
    config: str = "configs/deepspeed/zero3.json"


@dataclass
class WorkersConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    threads_per_worker: int | None = None  # torch threads per worker; default cpus_per_worker
    address: str | None = None  # Ray cluster address; None: join the job's cluster or start a local one
    max_failures: int = 0  # Ray Train restarts of the worker group after a worker dies (-1: no limit); each resumes from the last checkpoint
    collective_timeout_s: int = 1800  # a collective waiting this long for a vanished rank fails (a rank that raises ends the job at once)


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: sqlite:///<output_dir>/../mlflow.db (embedded)
    experiment: str = "lora-tsd"
    run_name: str | None = None
    offline: bool = False  # run without MLflow (metrics only to stdout)


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "train.schedule": ("linear", "cosine", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
}


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], path)
    if origin is list:
        (item,) = typing.get_args(tp)
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {value!r}")
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 2e-4 (no dot) as a string; accept numeric strings, name anything else.
            try:
                number = float(value) if isinstance(value, str) else _fail(path, tp, value)
            except ValueError:
                _fail(path, tp, value)
        else:
            number = float(value)
        # `.nan`, `.inf`, `--set x=nan` and `1e999` all parse as floats; no setting means any of
        # them, and a NaN learning rate only fails later, inside the optimizer on a worker.
        if not math.isfinite(number):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            _fail(path, tp, value)
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")


def _fail(path: str, tp: Any, value: Any):
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key; known keys here: {', '.join(sorted(known))}")
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        kwargs[key] = _convert(value, hints[key], where)
        if where in _CHOICES and kwargs[key] not in _CHOICES[where]:
            raise ConfigError(f"{where}: {kwargs[key]!r} is not one of {', '.join(_CHOICES[where])}")
    try:
        return cls(**kwargs)
    except TSDConfigError as e:  # the method validates itself; name the key's full path
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None


def _check(cfg: RunConfig) -> None:
    try:
        cfg.method.tsd()
    except TSDConfigError as e:
        raise ConfigError(f"method.{e}") from None
    t = cfg.train
    positive = {
        "train.micro_batch_size": t.micro_batch_size,
        "train.grad_accum": t.grad_accum,
        "workers.num_workers": cfg.workers.num_workers,
        "workers.cpus_per_worker": cfg.workers.cpus_per_worker,
        "workers.collective_timeout_s": cfg.workers.collective_timeout_s,
        "data.cutoff_len": cfg.data.cutoff_len,
        "train.eval_batch_size": t.eval_batch_size,
    }
    positive.update({
        "train.lr": t.lr,
        "train.epochs": t.epochs,  # even with max_steps set: a negative epoch count is a typo
        "train.log_every": t.log_every,  # the loop logs on step % log_every: 0 divides by zero
        "train.eval_max_new_tokens": t.eval_max_new_tokens,
        "train.eval_num_beams": t.eval_num_beams,
    })
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v}")
    # Optional counts: leaving them out is how to say "none"; 0 would silently mean the same
    # (the loop tests them for truth) or, for the limits, train/evaluate on nothing.
    optional = {
        "train.max_steps": t.max_steps,
        "train.checkpoint_every": t.checkpoint_every,
        "train.eval_limit": t.eval_limit,
        "data.limit": cfg.data.limit,
        "workers.threads_per_worker": cfg.workers.threads_per_worker,
    }
    for key, v in optional.items():
        if v is not None and v <= 0:
            raise ConfigError(f"{key}: must be > 0 or left out, got {v}")
    for key, v in {"train.warmup_steps": t.warmup_steps, "train.weight_decay": t.weight_decay}.items():
        if v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v}")
    if t.grad_clip < 0:  # DeepSpeed clips when gradient_clipping > 0
        raise ConfigError(f"train.grad_clip: must be >= 0 (0: no clipping), got {t.grad_clip}")
    if not 0 <= t.seed <= 2**32 - 1:  # numpy's seed range; random and torch accept it too
        raise ConfigError(f"train.seed: must be in [0, {2**32 - 1}], got {t.seed}")
    if cfg.workers.max_failures < -1:
        raise ConfigError(f"workers.max_failures: must be >= 0 (or -1 for no limit), got {cfg.workers.max_failures}")
    _check_names(cfg)
    if not cfg.model.path:
        raise ConfigError("model.path: required (a local Hugging Face model folder)")
    if not cfg.data.train:
        raise ConfigError("data.train: required (an LLM-Adapters JSON file, or a list of them)")
    cfg.data.test_sets()  # every test entry names its task


def _check_names(cfg: RunConfig) -> None:
    """The run's name and the tracking settings that need no file system or network."""
    name = cfg.name
    if not name.strip():
        raise ConfigError("name: must not be empty (it names the run folder <output_dir>/<name>)")
    # The run folder is <output_dir>/<name>: a separator or `..` would put it somewhere else.
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ConfigError(f"name: {name!r} must be a plain folder name (no '/', not '..'); set output_dir for the location")
    if not cfg.tracking.experiment.strip():
        raise ConfigError("tracking.experiment: must not be empty (the MLflow experiment to log into)")
    if cfg.tracking.uri and not cfg.tracking.offline:
        _check_tracking_uri(cfg.tracking.uri)


_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's database stores (+driver allowed)
_KNOWN_SCHEMES = ("", "file", "http", "https", "databricks", *_SQL_SCHEMES)


def _check_tracking_uri(uri: str) -> None:
    from urllib.parse import urlsplit

    shown = mask_secrets(uri)  # never echo a password
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if scheme not in _KNOWN_SCHEMES and not _mlflow_knows_scheme(uri):
        raise ConfigError(
            f"tracking.uri: unknown scheme {parts.scheme!r} in {shown!r}; use sqlite:///path/mlflow.db, "
            f"http(s)://host:port (an mlflow server) or file:///path"
        )
    if parts.scheme.lower() == "sqlite" and sqlite_path(uri) is None:  # (sqlite+driver: left to MLflow)
        # Driver and workers are separate processes: an in-memory store is a different empty
        # store in each, and the workers would not find the driver's run.
        raise ConfigError(
            f"tracking.uri: {shown!r} names no database file (an in-memory sqlite store is not shared with the "
            f"workers); write sqlite:///relative/mlflow.db or sqlite:////absolute/mlflow.db"
        )
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise ConfigError(f"tracking.uri: {shown!r} names no host; e.g. http://127.0.0.1:5000")
        try:
            parts.port
        except ValueError:
            raise ConfigError(f"tracking.uri: {shown!r}: port out of range (0-65535)") from None


def _mlflow_knows_scheme(uri: str) -> bool:
    """True when an MLflow store plugin handles `uri` (or when MLflow's registry cannot be asked)."""
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    except ImportError:  # a private MLflow name moved: let MLflow itself judge the URI later
        return True
    try:
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException:
        return False
    return True


# ----------------------------------------------------------------------------- paths
def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_folder_can_be_made(key: str, path: str | os.PathLike) -> None:
    """`path` is a writable folder or can be created as one: its nearest existing ancestor is a
    writable folder. Creates nothing (os.access, no probe file), so a refused run leaves no trace."""
    path = Path(path).expanduser().absolute()
    found = _existing_ancestor(path)
    if not found.is_dir():
        raise ConfigError(f"{key}: {found} is a file, not a folder")
    if not os.access(found, os.W_OK | os.X_OK):
        if found == path:
            raise ConfigError(f"{key}: {path} is not writable")
        raise ConfigError(f"{key}: {path} cannot be created: {found} is not writable")


def _check_input(key: str, path: str, kind: str) -> None:
    p = Path(path)
    if kind == "folder":
        if not p.exists():
            raise ConfigError(f"{key}: {p} does not exist")
        if not p.is_dir():
            raise ConfigError(f"{key}: {p} is a file, not a model folder")
        return
    if not p.exists():
        raise ConfigError(f"{key}: {p}: data file not found" if kind == "data" else f"{key}: {p} not found")
    if p.is_dir():
        raise ConfigError(f"{key}: {p} is a folder, not a {'data' if kind == 'data' else 'JSON'} file")


def check_paths(cfg: RunConfig) -> None:
    """Every path of a resolved config (pipeline.paths.resolve_paths), before anything is written:
    what the run reads exists and is a file or folder as needed; what it writes (run folder, SVD
    cache, the MLflow store) can be created. Raises ConfigError naming the key."""
    _check_input("model.path", cfg.model.path, "folder")
    for i, p in enumerate(cfg.data.train):
        _check_input("data.train" if len(cfg.data.train) == 1 else f"data.train[{i}]", p, "data")
    for i, entry in enumerate(cfg.data.test):
        _, sep, p = entry.partition("=")
        _check_input("data.test" if len(cfg.data.test) == 1 else f"data.test[{i}]", p if sep else entry, "data")
    _check_input("deepspeed.config", cfg.deepspeed.config, "json")
    check_folder_can_be_made("output_dir", cfg.output_dir)
    run_dir = Path(cfg.output_dir) / cfg.name
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"name: the run folder {run_dir} is a file, not a folder; remove it or choose another name")
    if cfg.method.svd_cache:
        check_folder_can_be_made("method.svd_cache", cfg.method.svd_cache)
    if cfg.tracking.uri and not cfg.tracking.offline:
        _check_store_path(cfg.tracking.uri)


def _check_store_path(uri: str) -> None:
    """A local MLflow store (sqlite file, file:// folder) can be opened or created."""
    from urllib.parse import urlsplit
    from urllib.request import url2pathname

    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if parts.scheme.lower() == "sqlite":
        db = sqlite_path(uri)
        if db is None:
            return  # refused by _check_tracking_uri
        if db.is_dir():
            raise ConfigError(f"tracking.uri: {db} is a folder, not a sqlite database file")
        if db.exists():
            if not os.access(db, os.R_OK | os.W_OK):
                raise ConfigError(f"tracking.uri: {db} is not writable")
        else:
            check_folder_can_be_made("tracking.uri", db.parent)
    elif scheme == "file":
        check_folder_can_be_made("tracking.uri", url2pathname(parts.path))
    elif scheme == "":  # a bare path: MLflow's file store
        check_folder_can_be_made("tracking.uri", uri)


def check_switch_fits(cfg: RunConfig, total_steps: int) -> None:
    """The switch must happen before training ends (checked once the data size is known)."""
    m = cfg.method
    last = max(switch_steps(m.tsd()).values(), default=None)  # the schedule tsd/switch.py runs
    if last is not None and last >= total_steps:
        raise ConfigError(
            f"method.switch_step: the {m.method} switch{'es end' if m.method == 'tsd' else ''} at optimizer step "
            f"{last} but training has only {total_steps} steps; lower switch_step or train longer"
        )


def from_dict(data: dict, source: str = "<config>") -> RunConfig:
    try:
        cfg = _build(RunConfig, data, "")
        _check(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config; `overrides` are `dotted.key=yaml_value` strings (CLI --set)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if root is not None:
        try:
            _refuse_duplicate_keys(root, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    for item in overrides or []:
        apply_override(data, item, str(path))
    return from_dict(data, str(path))


def _refuse_duplicate_keys(node: yaml.Node, path: str) -> None:
    """PyYAML keeps the last of two equal keys in one mapping without a word: a config edited
    in two places would silently run with whichever came last. Walk the composed document."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are YAML's own override mechanism
            where = f"{path}.{key_node.value}" if path else key_node.value
            line = key_node.start_mark.line + 1
            first = seen.get((key_node.tag, key_node.value))
            if first is not None:
                raise ConfigError(f"{where}: given twice (lines {first} and {line}); keep one")
            seen[(key_node.tag, key_node.value)] = line
            _refuse_duplicate_keys(value_node, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{i}]")


def apply_override(data: dict, item: str, source: str = "--set") -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{source}: override {item!r} must look like section.key=value")
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: override {item!r}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)
