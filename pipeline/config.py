"""The typed run config: YAML in, frozen pydantic dataclasses out, every key checked.

Unknown keys, wrong types and values out of range are refused with the key's dotted path and
the file, one line per problem, e.g. `configs/x.yaml: train.lr: expected a number, got 'fast'`.
Relative paths in the file are resolved against the current working directory when the run
starts (so the same config works locally and under `ray job submit --working-dir .`).

The sections are pydantic *dataclasses*, not BaseModels, because callers use the dataclass
protocol: pipeline.paths copies a config with `dataclasses.replace` (which validates the copy).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BeforeValidator, ConfigDict, StrictBool, StrictInt, StrictStr, TypeAdapter,
                      ValidationError, field_validator, model_validator)
from pydantic.dataclasses import dataclass

from pipeline.classification.head import HEAD_MODULES
from pipeline.precision import contradiction
from pipeline.tracking.store import tracking_uri_problem
from tsd.config import TSDConfig, TSDConfigError
from tsd.switch import switch_steps


class ConfigError(ValueError):
    """A run config is invalid; the message names the file, the key path and the problem."""


# ----------------------------------------------------------------------------- setting types
# Every section: no unknown keys (a typo must not silently become a default) and no NaN or
# infinity anywhere (`.nan`, `.inf`, `--set x=nan` and `1e999` all parse as floats; no setting
# means any of them, and a NaN learning rate would only fail later, inside a worker's optimizer).
_SECTION_RULES = ConfigDict(extra="forbid", allow_inf_nan=False)

# Strict: in a run config, YAML's `yes`, a quoted "8" or 2.0 for a count are typos, not values
# to coerce (pydantic's lax mode would read them as true, 8 and 2).
Flag = StrictBool
Integer = StrictInt
Text = StrictStr


def _not_a_flag(value: Any) -> Any:
    # A number stays lax, because YAML reads 2e-4 (no dot) as a string; but lax reads `true` as 1.0.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return value


def _as_list(value: Any) -> Any:
    # One entry may be written without brackets; `key:` with nothing after it is an empty list.
    return [] if value is None else [value] if isinstance(value, str) else value


def _must_be(rule: str, holds: Callable[[Any], bool]) -> AfterValidator:
    """Refuses a value for which `holds` is false: `must be <rule>, got <value>`."""

    def check(value: Any) -> Any:
        if not holds(value):
            raise ValueError(f"must be {rule}, got {value}")
        return value

    return AfterValidator(check)


Number = Annotated[float, BeforeValidator(_not_a_flag)]
TextList = Annotated[list[Text], BeforeValidator(_as_list)]
Count = Annotated[Integer, _must_be("> 0", lambda v: v > 0)]
PositiveNumber = Annotated[Number, _must_be("> 0", lambda v: v > 0)]
NonNegativeNumber = Annotated[Number, _must_be(">= 0", lambda v: v >= 0)]
# Optional counts: leaving them out is how to say "none"; 0 would silently mean the same (the
# loop tests them for truth) or, for the limits, train/evaluate on nothing.
OptionalCount = Annotated[Integer, _must_be("> 0 or left out", lambda v: v > 0)] | None


# ----------------------------------------------------------------------------- sections
@dataclass(config=_SECTION_RULES, frozen=True)
class ModelConfig:
    path: Text = ""  # a local Hugging Face model folder (no hub on these machines); required
    # causal_lm: generate answers (the paper's commonsense protocol; data in the LLM-Adapters format);
    # seq_cls: a classification head on the model (the paper's GLUE setting; data rows text/label).
    task: Literal["causal_lm", "seq_cls"] = "causal_lm"
    num_labels: OptionalCount = None  # seq_cls: classes; None: as many as data.train has
    # The weights as loaded; auto: the training precision's (train.precision), see pipeline/precision.py.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Attention kernel, passed to transformers; auto: transformers' choice (sdpa where the
    # architecture supports it, else eager). flash_attention_2 needs the flash-attn package and a GPU.
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    trust_remote_code: Flag = False
    # ZeRO-3 reads each rank's slices of the weight files itself. A folder it cannot read that way
    # (.bin weights; names transformers renames or fuses at load, e.g. Mixtral's experts) would be
    # loaded whole on rank 0 by transformers first: refused by name unless this allows it.
    allow_whole_load: Flag = False


@dataclass(config=_SECTION_RULES, frozen=True)
class DataConfig:
    # One or more LLM-Adapters JSON/JSONL files (instruction, input, output, answer), trained on
    # together: the paper's commonsense_170k is the eight tasks' training sets in one file.
    train: TextList = field(default_factory=list)
    # Test sets evaluated after training (the paper's protocol), each "task=path" or a path whose
    # task is data.task; the task picks the answer format (e.g. social_i_qa).
    test: TextList = field(default_factory=list)
    task: Text | None = None
    cutoff_len: Count = 256
    train_on_inputs: Flag = True  # LLM-Adapters' default: the loss covers the prompt too
    limit: OptionalCount = None  # use the first N training rows (demos, smoke tests)
    # Where the tokenized training set is cached (pipeline/data/cache.py): None is <output_dir>/data-cache,
    # on the disk every node shares (tokenized once per job); a node-local folder: once per node.
    cache_dir: Text | None = None

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


_METHOD_DEFAULTS = TSDConfig()  # the method library writes the defaults; this section reuses them


@dataclass(config=_SECTION_RULES, frozen=True)
class MethodConfig:
    """The method's settings, as tsd.TSDConfig documents them, plus where to cache SVDs. Here each
    gets its type; what the values must satisfy (r > 0, a known method, switch_step >= 1 ...)
    TSDConfig checks itself when tsd() builds it, which RunConfig does when it is validated."""

    method: Text = _METHOD_DEFAULTS.method  # lora | dash | init | tsd (tsd.config.METHODS)
    r: Integer = _METHOD_DEFAULTS.r
    alpha: Number = _METHOD_DEFAULTS.alpha
    dropout: Number = _METHOD_DEFAULTS.dropout
    use_rslora: Flag = _METHOD_DEFAULTS.use_rslora
    targets: TextList = field(default_factory=lambda: list(_METHOD_DEFAULTS.targets))
    switch_step: Integer = _METHOD_DEFAULTS.switch_step
    num_directions: Integer = _METHOD_DEFAULTS.num_directions
    dash_scaled: Flag = _METHOD_DEFAULTS.dash_scaled
    svd_dtype: Text = _METHOD_DEFAULTS.svd_dtype  # float32 | float64 (tsd.config.SVD_DTYPES)
    svd_cache: Text | None = None  # folder for cached decompositions, keyed by the base weights
    # Modules trained whole beside the adapter and exported with it (PEFT's modules_to_save);
    # None: the classification head (classifier / score) for model.task seq_cls, else none.
    modules_to_save: TextList | None = None

    def tsd(self) -> TSDConfig:
        """The method library's config of these settings (raises TSDConfigError if they are invalid)."""
        names = {f.name for f in dataclasses.fields(TSDConfig)}
        given = {k: v for k, v in dataclasses.asdict(self).items() if k in names and v is not None}
        return TSDConfig(**given)


@dataclass(config=_SECTION_RULES, frozen=True)
class TrainConfig:
    lr: PositiveNumber = 2e-4
    # The dash scalars' learning rate as a multiple of lr (methods dash and tsd); the schedule
    # applies to both. 1: the reference code's single rate, at which the zero-started scalars
    # stay small (docs/RESULTS.md, part 1).
    dash_lr_scale: PositiveNumber = 1.0
    weight_decay: NonNegativeNumber = 0.0
    warmup_steps: Annotated[Integer, _must_be(">= 0", lambda v: v >= 0)] = 100
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # after warmup; restarts for LoRA-Init
    micro_batch_size: Count = 4
    grad_accum: Count = 1
    epochs: PositiveNumber = 3.0  # even with max_steps set: a negative epoch count is a typo
    max_steps: OptionalCount = None  # optimizer steps; overrides epochs when set
    grad_clip: Annotated[Number, _must_be(">= 0 (0: no clipping)", lambda v: v >= 0)] = 1.0  # DeepSpeed clips when > 0
    # auto: bf16 on a GPU that has it, else fp32; decided with model.dtype (pipeline/precision.py).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Recompute each layer's activations in the backward pass instead of keeping them (transformers'
    # gradient checkpointing, non-reentrant): activation memory of one layer, not all, for ~30% more compute.
    gradient_checkpointing: Flag = False
    seed: Annotated[Integer, _must_be(f"in [0, {2**32 - 1}]", lambda v: 0 <= v < 2**32)] = 42  # numpy's range (random, torch: too)
    log_every: Count = 1  # the loop logs on step % log_every: 0 would divide by zero
    checkpoint_every: OptionalCount = None  # optimizer steps; None: only at the end
    # the newest N checkpoints are kept, older ones deleted once a newer one is complete; None: keep all
    keep_checkpoints: OptionalCount = 2
    eval_max_new_tokens: Count = 32
    eval_num_beams: Count = 4
    eval_limit: OptionalCount = None  # the first N rows of each test set
    eval_batch_size: Count = 1  # rows generated together (left-padded); the paper's harness uses 1
    # Evaluate on a whole model copy per rank (fast) or on the ZeRO-3 partitioned model (memory /
    # world); auto: whole when it fits every rank's budget (pipeline.eval_memory.choose_eval_model).
    eval_model: Literal["auto", "whole", "partitioned"] = "auto"


@dataclass(config=_SECTION_RULES, frozen=True)
class DeepSpeedConfig:
    # The DeepSpeed JSON: batch, precision, ZeRO settings ("auto" values are filled by the pipeline).
    config: Text = "configs/deepspeed/default.json"
    # How the weights are spread over the ranks: zero3 (partitioned: models too big for one rank),
    # zero2 (whole weights, partitioned optimizer state), ddp (plain data parallel, DeepSpeed stage 0);
    # auto: the fastest that fits every rank's memory (pipeline.training.strategy). A stage written in
    # the JSON counts as the user's choice.
    strategy: Literal["auto", "zero3", "zero2", "ddp"] = "auto"


@dataclass(config=_SECTION_RULES, frozen=True)
class WorkersConfig:
    num_workers: Count = 2
    use_gpu: Flag = False
    cpus_per_worker: Count = 1
    threads_per_worker: OptionalCount = None  # torch threads per worker; default cpus_per_worker
    address: Text | None = None  # Ray cluster address; None: join the job's cluster or start a local one
    # Ray Train restarts of the worker group after a worker dies (-1: no limit); each resumes from the last checkpoint
    max_failures: Annotated[Integer, _must_be(">= 0 (or -1 for no limit)", lambda v: v >= -1)] = 0
    collective_timeout_s: Count = 1800  # a collective waiting this long for a vanished rank fails (a rank that raises ends the job at once)
    # How Ray places the workers on nodes: PACK fills a node first; STRICT_SPREAD puts each on its own node.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # The memory one rank may use, in GiB; None: measured (a GPU's free memory, or the node's
    # available RAM shared by its ranks). Decides whether a whole model copy fits a rank
    # (ZeRO-3's limits: training.memory.whole_model_fits; the evaluation path: eval_memory).
    memory_budget_gb: PositiveNumber | None = None


@dataclass(config=_SECTION_RULES, frozen=True)
class TrackingConfig:
    uri: Text | None = None  # None: sqlite:///<output_dir>/../mlflow.db (embedded)
    experiment: Text = "lora-tsd"
    run_name: Text | None = None
    offline: Flag = False  # run without MLflow (metrics only to stdout)
    register_as: Text | None = None  # register the exported adapter in MLflow's model registry under this name
    # MLflow system metrics (CPU, memory, disk, network, GPU) every N seconds, one series per node; None: off
    system_metrics_every_s: Annotated[Number, _must_be("> 0 or left out", lambda v: v > 0)] | None = None

    @field_validator("experiment")
    @classmethod
    def _experiment_named(cls, experiment: str) -> str:
        if not experiment.strip():
            raise ValueError("must not be empty (the MLflow experiment to log into)")
        return experiment

    @field_validator("register_as")
    @classmethod
    def _registrable_name(cls, name: str | None) -> str | None:
        # Refused here, not by MLflow's registry after hours of training.
        if name is not None and not name.strip():
            raise ValueError("must not be empty (the registered model's name); leave it out to register nothing")
        if name is not None and ("/" in name or ":" in name):
            raise ValueError(f"{name!r}: MLflow's model registry refuses '/' and ':' in a model name")
        return name


@dataclass(config=_SECTION_RULES, frozen=True)
class RunConfig:
    name: Text = "run"
    output_dir: Text = "runs"
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

    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("must not be empty (it names the run folder <output_dir>/<name>)")
        # The run folder is <output_dir>/<name>: a separator or `..` would put it somewhere else.
        if "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"{name!r} must be a plain folder name (no '/', not '..'); set output_dir for the location")
        return name

    @model_validator(mode="after")
    def _check_together(self) -> RunConfig:
        """What needs more than one setting, or a default that is not a value; runs once every
        setting has its type and range. Raised here, at the top, so each message names its full key."""
        if self.method.modules_to_save is None:  # the default depends on the task: settled once, here
            saved = list(HEAD_MODULES) if self.model.task == "seq_cls" else []
            object.__setattr__(self, "method", dataclasses.replace(self.method, modules_to_save=saved))
        if self.train.dash_lr_scale != 1.0 and self.method.method not in ("dash", "tsd"):
            raise ConfigError(f"train.dash_lr_scale: only for methods dash and tsd (it sets the dash scalars' "
                              f"rate); method is {self.method.method!r}")
        precision_problem = contradiction(self.train.precision, self.model.dtype)
        if precision_problem:
            raise ConfigError(precision_problem)
        if self.model.num_labels is not None and self.model.task != "seq_cls":
            raise ConfigError("model.num_labels: only for model.task seq_cls (a classification head)")
        try:
            self.method.tsd()
        except TSDConfigError as e:  # the method validates itself; name the key's full path
            raise ConfigError(f"method.{e}") from None
        if not self.model.path:
            raise ConfigError("model.path: required (a local Hugging Face model folder)")
        if not self.data.train:
            raise ConfigError("data.train: required (an LLM-Adapters JSON file, or a list of them; for model.task "
                              "seq_cls, files of text/label rows)")
        self.data.test_sets()  # every test entry names its task
        if self.tracking.uri and not self.tracking.offline:
            problem = tracking_uri_problem(self.tracking.uri)
            if problem:
                raise ConfigError(problem)
        return self


# ----------------------------------------------------------------------------- pydantic's errors in our words
_EXPECTED = {  # pydantic's error type -> what the setting expected
    "int_type": "an integer", "float_type": "a number", "float_parsing": "a number", "bool_type": "true/false",
    "string_type": "a string", "list_type": "a list", "dataclass_type": "a mapping of settings",
}


def _problem_lines(error: ValidationError) -> list[str]:
    """One line per problem: `dotted.key: what is wrong`, never pydantic's multi-line report."""
    lines = []
    for problem in error.errors():
        kind, value, loc = problem["type"], problem["input"], problem["loc"]
        if kind in _EXPECTED:
            text = f"expected {_EXPECTED[kind]}, got {value!r}"
        elif kind == "finite_number":
            text = f"must be a finite number, got {value!r}"
        elif kind == "literal_error":
            text = f"{value!r} is not one of {problem['ctx']['expected']}"
        elif kind in ("unexpected_keyword_argument", "extra_forbidden", "invalid_key"):
            text = f"unknown key; known keys here: {', '.join(_keys_of(loc[:-1]))}"
            loc = (*loc[:-1], str(loc[-1]))  # a YAML key may be a number: still a key, not a list index
        elif kind == "value_error":  # the validators above (and tsd's) wrote the words themselves
            text = str(problem["ctx"]["error"])
        else:  # a kind not mapped yet: pydantic's own words, still on one line with the key
            text = problem["msg"]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        lines.append(f"{where}: {text}" if where else text)
    return lines


def _keys_of(section: tuple) -> list[str]:
    """The setting names of the section at `section` (a path of field names from RunConfig)."""
    cls: Any = RunConfig
    for name in section:
        cls = cls.__pydantic_fields__[name].annotation
    return sorted(cls.__pydantic_fields__)


def check_switch_fits(cfg: RunConfig, total_steps: int) -> None:
    """The switch must happen before training ends (checked once the data size is known)."""
    m = cfg.method
    last = max(switch_steps(m.tsd()).values(), default=None)  # the schedule tsd/switch.py runs
    if last is not None and last >= total_steps:
        raise ConfigError(
            f"method.switch_step: the {m.method} switch{'es end' if m.method == 'tsd' else ''} at optimizer step "
            f"{last} but training has only {total_steps} steps; lower switch_step or train longer"
        )


# ----------------------------------------------------------------------------- loading
_RUN_CONFIG = TypeAdapter(RunConfig)


def from_dict(data: dict, source: str = "<config>") -> RunConfig:
    """A validated RunConfig; every problem becomes one `source: key: problem` line of a ConfigError."""
    try:
        return _RUN_CONFIG.validate_python(data)
    except ValidationError as e:
        raise ConfigError("\n".join(f"{source}: {line}" for line in _problem_lines(e))) from None


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
