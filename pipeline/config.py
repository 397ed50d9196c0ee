"""The typed run config: YAML in, nested dataclasses out, every key checked.

Unknown keys and wrong types are rejected with the key's dotted path and the file, e.g.
`configs/x.yaml: train.lr: expected a number, got 'fast'`. Relative paths in the file are
resolved against the current working directory when the run starts (so the same config works
locally and under `ray job submit --working-dir .`).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tsd.config import TSDConfig, TSDConfigError


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
                return float(value) if isinstance(value, str) else _fail(path, tp, value)
            except ValueError:
                _fail(path, tp, value)
        return float(value)
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
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v}")
    if cfg.workers.max_failures < -1:
        raise ConfigError(f"workers.max_failures: must be >= 0 (or -1 for no limit), got {cfg.workers.max_failures}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {t.lr}")
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError(f"train.max_steps: must be > 0, got {t.max_steps}")
    if t.max_steps is None and t.epochs <= 0:
        raise ConfigError(f"train.epochs: must be > 0, got {t.epochs}")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    if not cfg.model.path:
        raise ConfigError("model.path: required (a local Hugging Face model folder)")
    if not cfg.data.train:
        raise ConfigError("data.train: required (an LLM-Adapters JSON file, or a list of them)")
    cfg.data.test_sets()  # every test entry names its task
    if cfg.method.method != "lora" and cfg.method.switch_step < 1:
        raise ConfigError(f"method.switch_step: must be >= 1 for method {cfg.method.method!r}")


def check_switch_fits(cfg: RunConfig, total_steps: int) -> None:
    """The switch must happen before training ends (checked once the data size is known)."""
    m = cfg.method
    last = {"lora": None, "dash": m.switch_step, "init": m.switch_step, "tsd": 2 * m.switch_step}[m.method]
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
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    for item in overrides or []:
        apply_override(data, item, str(path))
    return from_dict(data, str(path))


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
