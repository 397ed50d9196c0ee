"""method: full — the paper's "Fully FT" baseline under the same pipeline (2-rank ZeRO-3).

The exported model (safetensors written one gathered parameter at a time) must hold exactly the
trained weights: checked against DeepSpeed's own consolidation of the run's last checkpoint
(deepspeed.utils.zero_to_fp32, an independent path), and the reloaded model's logits against a
model given those weights. A run stopped at step 2 and resumed ends with the uninterrupted
run's model. The Ray launcher (`tsd train`) and the DeepSpeed launcher run the same loop to the
same model, and the Ray run's MLflow run holds it.
"""

from pathlib import Path

import pytest
import torch
import yaml
from proc_group import BIN, ROOT, child_env, make_tiny_model, run_group, tiny_config, train_config
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _run(wd: Path, name: str, copy_from: Path | None = None, stop_at: int | None = None) -> Path:
    cfg = tiny_config(wd / "model", wd / "runs", name)
    cfg["method"].update(method="full")
    cfg["train"].update(max_steps=4, checkpoint_every=1, keep_checkpoints=None, lr=1e-3)
    cfg["tracking"].update(offline=True)
    proc = train_config(cfg, wd, copy_from=copy_from, stop_at=stop_at)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    return wd / "runs" / name


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("full")
    make_tiny_model(wd / "model")
    return wd, _run(wd, "full")


def test_exported_model_is_the_trained_model(full_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    wd, run = full_run
    exported = load_file(str(run / "model/model.safetensors"))
    trained = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step4")
    base = load_file(str(wd / "model/model.safetensors"))
    assert set(exported) <= set(trained) and len(exported) >= len(base) - 1  # lm_head tied: once
    moved = 0
    for k, v in exported.items():
        torch.testing.assert_close(v, trained[k].to(v.dtype), atol=0, rtol=0, msg=k)
        moved += int(not torch.equal(v, base[k]))
    assert moved == len(exported)  # every parameter trained
    # The folder stands alone: the base's tokenizer is in it
    from transformers import AutoTokenizer

    text = "Answer the question : who wins ?"
    assert AutoTokenizer.from_pretrained(str(run / "model"))(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(str(wd / "model"))(text)["input_ids"]
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    reloaded = AutoModelForCausalLM.from_pretrained(str(run / "model")).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(wd / "model")).eval()
    reference.load_state_dict({k: trained[k] for k in reference.state_dict() if k in trained}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, atol=0, rtol=0)


def test_full_run_resumes_to_the_same_model(full_run):
    wd, run = full_run
    resumed = _run(wd, "full-resumed", copy_from=run, stop_at=2)
    a, b = load_file(str(run / "model/model.safetensors")), load_file(str(resumed / "model/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("launcher", ["ray", "deepspeed"])
def test_other_launchers_train_the_same_full_model(full_run, launcher):
    import mlflow

    wd, run = full_run
    name = f"full-{launcher}"
    cfg = tiny_config(wd / "model", wd / "runs", name)
    cfg["method"].update(method="full")
    cfg["train"].update(max_steps=4, checkpoint_every=1, keep_checkpoints=None, lr=1e-3)
    cfg["tracking"].update(uri=f"sqlite:///{wd}/mlflow.db", experiment="full")
    path = wd / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [str(BIN / "tsd"), "train", str(path)] if launcher == "ray" else ["bash", "launch/deepspeed.sh", str(path)]
    env = child_env(NPROC="2", MASTER_PORT="29547", DEEPSPEED=str(BIN / "deepspeed"))
    proc = run_group(cmd, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    a, b = load_file(str(run / "model/model.safetensors")), load_file(str(wd / "runs" / name / "model/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    client = mlflow.MlflowClient(f"sqlite:///{wd}/mlflow.db")
    (mlrun,) = [r for r in client.search_runs([client.get_experiment_by_name("full").experiment_id])
                if r.info.run_name == name]
    assert mlrun.info.status == "FINISHED" and mlrun.data.params["method.method"] == "full"
    assert {f.path for f in client.list_artifacts(mlrun.info.run_id, "model")} >= {"model/model.safetensors",
                                                                                   "model/config.json"}
