"""The typed run config: every shipped config loads; bad keys and values name their path."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, apply_override, check_switch_fits, from_dict, load_config

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
        (_with(workers={"use_gpu": "yes"}), "workers.use_gpu: expected true/false"),
        (_with(method={"switch_step": 0}), "method.switch_step: must be >= 1"),
        ({"data": {"train": "d"}}, "model.path: required"),
        (_with(model="x"), "model: expected a mapping"),
    ],
)
def test_bad_values_name_their_key(data, message):
    with pytest.raises(ConfigError, match=None) as e:
        from_dict(data, "x.yaml")
    assert str(e.value).startswith("x.yaml: ")
    assert message in str(e.value)


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

    from pipeline.data import load_many

    for name, answer in (("a.json", "answer1"), ("b.json", "true")):
        (tmp_path / name).write_text(json.dumps([{"instruction": f"q {name}", "output": answer, "answer": answer}]))
    rows = load_many([tmp_path / "a.json", tmp_path / "b.json"])
    assert [r["answer"] for r in rows] == ["answer1", "true"]
