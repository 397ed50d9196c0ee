"""The typed run config: every shipped config loads; bad keys and values name their path."""

import dataclasses
from pathlib import Path

import pytest

from pipeline.config import ConfigError, apply_override, check_switch_fits, from_dict, load_config
from tsd.config import TSDConfig

ROOT = Path(__file__).resolve().parents[1]
MIN = {"model": {"path": "m"}, "data": {"train": "d.json"}}


def _with(**sections):
    data = {k: dict(v) for k, v in MIN.items()}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    return data


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/**/*.yaml")))
def test_every_shipped_config_loads(path):
    cfg = load_config(ROOT / path)
    assert cfg.method.tsd().r == cfg.method.r


def test_values_and_defaults():
    cfg = from_dict(_with(method={"method": "tsd", "r": 4, "alpha": 8}, train={"lr": "2e-4"}))
    assert cfg.method.tsd().scaling == 2.0
    assert cfg.train.lr == 2e-4  # YAML reads 2e-4 as a string; numeric strings are accepted
    assert cfg.method.targets == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    "data, message",
    [
        (_with(method={"rank": 8}), "method.rank: unknown key"),
        (_with(trian={"lr": 1}), "trian: unknown key"),
        (_with(train={"lr": "fast"}), "train.lr: expected a number, got 'fast'"),
        (_with(train={"micro_batch_size": 2.5}), "train.micro_batch_size: expected an integer"),
        (_with(train={"micro_batch_size": 0}), "train.micro_batch_size: must be > 0"),
        (_with(method={"method": "dora"}), "method.method: unknown method 'dora'"),
        (_with(method={"r": 0}), "method.r: the LoRA rank must be a positive integer"),
        (_with(method={"targets": [1]}), "method.targets[0]: expected a string"),
        (_with(train={"precision": "fp8"}), "train.precision: 'fp8' is not one of"),
        (_with(train={"schedule": "cosin"}), "train.schedule: 'cosin' is not one of 'linear', 'cosine' or 'constant'"),
        (_with(model={"dtype": "int4"}), "model.dtype: 'int4' is not one of"),
        (_with(method={"svd_dtype": "float16"}), "method.svd_dtype: choose one of float32, float64"),
        (_with(workers={"use_gpu": "yes"}), "workers.use_gpu: expected true/false"),
        (_with(method={"switch_step": 0}), "method.switch_step: must be an integer >= 1 for method 'dash'"),
        ({"data": {"train": "d"}}, "model.path: required"),
        (_with(model="x"), "model: expected a mapping"),
        # non-finite numbers, whatever their spelling
        (_with(train={"lr": float("nan")}), "train.lr: must be a finite number, got nan"),
        (_with(train={"lr": "inf"}), "train.lr: must be a finite number, got 'inf'"),
        (_with(train={"grad_clip": "1e999"}), "train.grad_clip: must be a finite number, got '1e999'"),
        (_with(method={"alpha": float("-inf")}), "method.alpha: must be a finite number"),
        # ranges
        (_with(train={"weight_decay": -1}), "train.weight_decay: must be >= 0, got -1.0"),
        (_with(train={"grad_clip": -0.5}), "train.grad_clip: must be >= 0 (0: no clipping), got -0.5"),
        (_with(train={"seed": -1}), "train.seed: must be in [0, 4294967295], got -1"),
        (_with(train={"log_every": 0}), "train.log_every: must be > 0, got 0"),
        (_with(train={"epochs": 0, "max_steps": 10}), "train.epochs: must be > 0, got 0.0"),
        (_with(train={"checkpoint_every": 0}), "train.checkpoint_every: must be > 0 or left out, got 0"),
        (_with(train={"eval_limit": -1}), "train.eval_limit: must be > 0 or left out, got -1"),
        (_with(train={"eval_num_beams": 0}), "train.eval_num_beams: must be > 0, got 0"),
        (_with(train={"dash_lr_scale": 0}), "train.dash_lr_scale: must be > 0, got 0"),
        (_with(method={"method": "lora"}, train={"dash_lr_scale": 10}),
         "train.dash_lr_scale: only for methods dash and tsd (it sets the dash scalars' rate); method is 'lora'"),
        (_with(data={"limit": 0}), "data.limit: must be > 0 or left out, got 0"),
        (_with(workers={"threads_per_worker": -2}), "workers.threads_per_worker: must be > 0 or left out"),
        # names and tracking URIs (no file system or network needed); passwords never echoed
        (_with(name=""), "name: must not be empty"),
        (_with(name="a/b"), "name: 'a/b' must be a plain folder name"),
        (_with(name=".."), "name: '..' must be a plain folder name"),
        (_with(tracking={"experiment": " "}), "tracking.experiment: must not be empty"),
        (_with(tracking={"uri": "htp://u:pw@h:5000"}), "tracking.uri: unknown scheme 'htp' in 'htp://u:***@h:5000'"),
        (_with(tracking={"uri": "sqlite://"}), "tracking.uri: 'sqlite://' names no database file"),
        (_with(tracking={"uri": "https://u:pw@:443"}), "tracking.uri: 'https://u:***@:443' names no host"),
        (_with(tracking={"uri": "http://h:70000"}), "tracking.uri: 'http://h:70000': port out of range"),
        # the model registry's name for the exported adapter: absent, or a name MLflow accepts
        (_with(tracking={"register_as": " "}), "tracking.register_as: must not be empty"),
        (_with(tracking={"register_as": "team/adapter"}), "tracking.register_as: 'team/adapter': MLflow's model registry"),
        (_with(tracking={"register_as": 7}), "tracking.register_as: expected a string, got 7"),
    ],
)
def test_bad_values_name_their_key(data, message):
    with pytest.raises(ConfigError, match=None) as e:
        from_dict(data, "x.yaml")
    assert str(e.value).startswith("x.yaml: ")
    assert message in str(e.value)
    assert "pw@" not in str(e.value)


def test_every_problem_is_one_line_naming_the_file_and_key():
    """All problems at once (not one per attempt), each on its own line; no pydantic report."""
    data = _with(train={"lr": "fast", "seed": -1, "warmup": 3}, method={"targets": ["q_proj", 7]})
    with pytest.raises(ConfigError) as e:
        from_dict(data, "x.yaml")
    assert str(e.value).splitlines() == [
        "x.yaml: method.targets[1]: expected a string, got 7",
        "x.yaml: train.lr: expected a number, got 'fast'",
        "x.yaml: train.seed: must be in [0, 4294967295], got -1",
        "x.yaml: train.warmup: unknown key; known keys here: checkpoint_every, dash_lr_scale, epochs, eval_batch_size, eval_limit, "
        "eval_max_new_tokens, eval_model, eval_num_beams, grad_accum, grad_clip, gradient_checkpointing, "
        "keep_checkpoints, log_every, lr, max_steps, "
            "micro_batch_size, "
        "precision, schedule, seed, warmup_steps, weight_decay",
    ]
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no pydantic traceback behind it


def test_method_section_is_the_method_librarys_config():
    """MethodConfig types the settings of tsd.TSDConfig, with its defaults, plus svd_cache."""
    cfg = from_dict(MIN)
    assert cfg.method.tsd() == TSDConfig()
    assert {f.name for f in dataclasses.fields(cfg.method)} == {f.name for f in dataclasses.fields(TSDConfig)} | {"svd_cache"}


def test_register_as_is_optional():
    assert from_dict(MIN).tracking.register_as is None
    assert from_dict(_with(tracking={"register_as": "lora-tsd-adapter"})).tracking.register_as == "lora-tsd-adapter"


def test_a_config_is_frozen_and_survives_the_trip_to_the_workers():
    """The driver sends to_dict() to the workers, which rebuild it with from_dict; paths.resolve_paths
    copies it with dataclasses.replace, which validates the copy."""
    cfg = from_dict(_with(method={"method": "tsd"}, tracking={"register_as": "m"}))
    assert from_dict(cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    assert dataclasses.replace(cfg.train, lr=0.5).lr == 0.5
    with pytest.raises(ValueError, match="finite"):
        dataclasses.replace(cfg.train, lr=float("nan"))


@pytest.mark.parametrize(
    "uri",
    ["sqlite:///runs/mlflow.db", "sqlite:////abs/mlflow.db", "sqlite+pysqlite:///m.db", "http://u:pw@127.0.0.1:5000",
     "https://mlflow.example.org", "file:///tmp/mlruns", "mlruns", "postgresql://u:pw@db/mlflow", "databricks"],
)
def test_valid_tracking_uris_pass(uri):
    assert from_dict(_with(tracking={"uri": uri})).tracking.uri == uri


def test_an_offline_run_ignores_its_tracking_uri():
    assert from_dict(_with(tracking={"uri": "htp://x", "offline": True})).tracking.offline


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  lr: 0.1\n  lr: 0.2\n", "x.yaml: train.lr: given twice (lines 2 and 3); keep one"),
        ("model: {path: m, path: n}\n", "x.yaml: model.path: given twice (lines 1 and 1)"),
        ("data:\n  train: [d.json]\ndata:\n  task: boolq\n", "x.yaml: data: given twice (lines 1 and 3)"),
        ("method:\n  targets:\n    - {a: 1, a: 2}\n", "x.yaml: method.targets[0].a: given twice"),
    ],
)
def test_duplicated_keys_are_refused(tmp_path, text, message):
    (tmp_path / "x.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "x.yaml")
    assert str(e.value).startswith(str(tmp_path / "x.yaml"))
    assert message in str(e.value)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    """`<<: *anchor` then an override is YAML's own way to repeat a key on purpose."""
    text = "model: {path: m}\ndata: {train: d.json}\ntrain:\n  <<: {lr: 0.1, warmup_steps: 1}\n  lr: 0.2\n"
    (tmp_path / "x.yaml").write_text(text)
    cfg = load_config(tmp_path / "x.yaml")
    assert cfg.train.lr == 0.2 and cfg.train.warmup_steps == 1


def test_switch_must_fit_in_training():
    cfg = from_dict(_with(method={"method": "tsd", "switch_step": 10}))
    check_switch_fits(cfg, 21)
    with pytest.raises(ConfigError, match="method.switch_step: .* step 20 but training has only 20 steps"):
        check_switch_fits(cfg, 20)


def test_overrides_and_file_errors(tmp_path):
    data = {}
    apply_override(data, "method.r=16")
    apply_override(data, "method.targets=[q_proj, v_proj]")
    assert data == {"method": {"r": 16, "targets": ["q_proj", "v_proj"]}}
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_override(data, "method.r")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_several_training_files_and_test_sets(tmp_path):
    """The paper's shape: one training mixture, several test sets each with its task."""
    from pipeline.paths import resolve_paths

    cfg = from_dict(_with(data={"train": ["a.json", "b.json"], "test": ["quartz=q/test.json", "s.json"], "task": "boolq"}))
    assert cfg.data.train == ["a.json", "b.json"]
    assert cfg.data.test_sets() == {"quartz": "q/test.json", "boolq": "s.json"}
    # A single path (the older form) is a one-item list; no test set at all is allowed.
    assert from_dict(_with(data={"train": "d.json", "test": "t.json", "task": "piqa"})).data.test_sets() == {"piqa": "t.json"}
    assert from_dict(MIN).data.test_sets() == {}
    # Relative paths resolve against the launch folder; the task= prefix stays.
    resolved = resolve_paths(cfg, tmp_path).data
    assert resolved.train == [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert resolved.test == [f"quartz={tmp_path / 'q/test.json'}", str(tmp_path / "s.json")]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"test": ["t.json"]}, "data.task: required with data.test entry 't.json'"),
        ({"test": ["piqa=a.json", "piqa=b.json"]}, "data.test[1]: task 'piqa' is given twice"),
        ({"test": ["=a.json"]}, "data.test[0]: '=a.json': expected task=path or a path"),
        ({"train": []}, "data.train: required"),
    ],
)
def test_bad_data_lists_name_the_entry(data, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(_with(data={"train": "d.json", **data}), "x.yaml")


def test_training_files_are_used_together_in_order(tmp_path):
    import json

    from pipeline.data.tasks import load_many

    for name, answer in (("a.json", "answer1"), ("b.json", "true")):
        (tmp_path / name).write_text(json.dumps([{"instruction": f"q {name}", "output": answer, "answer": answer}]))
    rows = load_many([tmp_path / "a.json", tmp_path / "b.json"])
    assert [r["answer"] for r in rows] == ["answer1", "true"]
