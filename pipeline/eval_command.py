"""`tsd evaluate`: a base model folder and an exported adapter (or a merged/full model folder)
loaded as stock transformers + PEFT would, evaluated by generation or classification, the result
written and optionally logged to an MLflow run. Also run on several ranks (torchrun): rows are
sharded and gathered as in pipeline.evaluate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from pipeline.data.tasks import load_records
from pipeline.evaluate import evaluate_tasks, log_results, row_format, write_results
from pipeline.file_checks import check_adapter_folder, check_model_folder
from pipeline.logs import log
from pipeline.classification.head import HEAD_MODULES, head_config
from pipeline.model_task import task_of_folder
from pipeline.tracking.logger import RunLogger
from pipeline.tracking.secrets import mask_secrets
from pipeline.tracking.store import DB_FILE, check_reachable, resolve_tracking_uri
from pipeline.training.distributed import bind_device, leave_process_group, rank_and_world
from tsd.export import SIDECAR, load_adapter, read_sidecar


def parse_data_arg(spec: str) -> tuple[str, Path]:
    """"task=path.json" -> (task, path). Without "task=", the task is the file's folder name
    when the file is test.json(l) (LLM-Adapters' dataset/<task>/test.json), else its stem."""
    if "=" in spec:
        task, _, path = spec.partition("=")
        if not task or not path:
            raise ValueError(f"--data {spec!r}: expected TASK=PATH")
        return task, Path(path)
    p = Path(spec)
    return (p.parent.name if p.stem == "test" and p.parent.name else p.stem), p


def load_tasks(specs: Sequence[str]) -> dict[str, list[dict]]:
    tasks: dict[str, list[dict]] = {}
    for spec in specs:
        task, path = parse_data_arg(spec)
        if task in tasks:
            raise ValueError(f"--data: task {task!r} given twice")
        tasks[task] = load_records(path)
        row_format(task, tasks[task][0])
    return tasks


def load_model(model_dir: str | os.PathLike | None, adapter_dir: str | os.PathLike | None = None,
               dtype: str = "float32", device: str | None = None):
    """(model, tokenizer): the base model folder plus, optionally, an exported adapter.

    A lora-tsd adapter (with tsd_state.safetensors) is restored with `tsd.load_adapter` on the
    original base, unmerged; a stock PEFT adapter (no sidecar) with `PeftModel.from_pretrained`.
    Without `model_dir` the base recorded in the adapter is used.
    """
    adapter = Path(adapter_dir) if adapter_dir else None
    if adapter is not None and not adapter.is_dir():
        raise FileNotFoundError(f"--adapter: {adapter} is not a folder")
    if adapter is not None:
        check_adapter_folder(adapter, "--adapter")  # truncated or garbage files: named, before any library reads them
    if model_dir is None:
        model_dir = _recorded_base(adapter) if adapter is not None else None
        if not model_dir:
            raise ValueError("--model is required (the adapter records no base model path)")
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model: {path} is not a Hugging Face model folder (no config.json)")
    check_model_folder(path, "--model")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype: {dtype!r} is not one of float32, bfloat16, float16")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    classes = adapter_classes(adapter) if adapter is not None else None
    if classes is None and task_of_folder(path) == "seq_cls":  # a fully fine-tuned classifier
        model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=getattr(torch, dtype))
    elif classes is not None:  # a head over `classes`, filled from the adapter below
        config = AutoConfig.from_pretrained(str(path))
        head_config(config, len(classes), classes, tokenizer.pad_token_id)
        model = AutoModelForSequenceClassification.from_pretrained(str(path), config=config, dtype=getattr(torch, dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    if adapter is not None:
        if (adapter / SIDECAR).is_file():
            load_adapter(model, adapter)
        elif (adapter / "adapter_config.json").is_file():
            model = PeftModel.from_pretrained(model, str(adapter))
        else:
            raise FileNotFoundError(f"--adapter: {adapter} holds neither {SIDECAR} nor adapter_config.json")
    model.to(device)
    model.eval()
    return model, tokenizer


def adapter_classes(adapter: Path) -> list[str] | None:
    """The class names of a classifier's adapter, in id order (None: not a classifier): the names
    a lora-tsd sidecar records, else for a stock PEFT SEQ_CLS adapter ids "0".."k-1", k read
    from its head's weight."""
    if (adapter / SIDECAR).is_file():
        _, _, metadata = read_sidecar(adapter)
        if "labels" in metadata:
            return json.loads(metadata["labels"])
    config = adapter / "adapter_config.json"
    if not config.is_file() or json.loads(config.read_text()).get("task_type") != "SEQ_CLS":
        return None
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        heads = [k for k in f.keys() if k.endswith(tuple(f"{h}.weight" for h in HEAD_MODULES)) and "lora_" not in k]
        if not heads:
            raise ValueError(f"--adapter: {adapter} is a SEQ_CLS adapter without a saved head ({', '.join(HEAD_MODULES)})")
        return [str(i) for i in range(f.get_slice(heads[0]).get_shape()[0])]


def model_classes(model) -> list[str] | None:
    """A loaded classifier's class names in id order (its config's id2label), else None."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not type(base).__name__.endswith("ForSequenceClassification"):
        return None
    return [str(base.config.id2label[i]) for i in range(base.config.num_labels)]


def _recorded_base(adapter: Path) -> str | None:
    cfg = adapter / "adapter_config.json"
    if cfg.is_file():
        base = json.loads(cfg.read_text()).get("base_model_name_or_path")
        if base and Path(base).is_dir():
            return base
    return None


# ----------------------------------------------------------------------------- the command
def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the embedded store `tsd train` uses by default (runs/mlflow.db)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return resolve_tracking_uri(env, "runs")
    return "sqlite:///" + (Path("runs").resolve() / DB_FILE).as_posix()  # no folder made just by asking


def _init_distributed_from_env() -> bool:
    """Join the process group a launcher (torchrun, deepspeed) describes in the environment."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    bind_device()  # cuda:LOCAL_RANK before the group exists (a no-op on CPU)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def run_evaluation(
    model: str | None,
    adapter: str | None,
    data: Sequence[str],
    *,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    batch_size: int = 1,
    limit: int | None = None,
    use_input: bool = False,
    out: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    step: int | None = None,
) -> dict:
    """`tsd evaluate`: load, evaluate (sharded over ranks when launched by torchrun), write the
    predictions and metrics to `out` and, with `run_id`, log them to that MLflow run (rank 0)."""
    started = _init_distributed_from_env()
    finished = False
    try:
        rank, _ = rank_and_world()
        if device is None and torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"
        uri = tracking_uri or default_tracking_uri()
        if run_id:  # before hours of generation, not after (every rank checks: none is left waiting)
            check_reachable(uri, "--tracking-uri" if tracking_uri else "$MLFLOW_TRACKING_URI",
                            "start it, or fix the URI, or leave out --run-id to evaluate without logging")
            if not RunLogger(uri, run_id).verify():
                raise ValueError(f"--run-id {run_id}: no such MLflow run at {mask_secrets(uri)} (see the warning above)")
        mdl, tok = load_model(model, adapter, dtype=dtype, device=device)
        classes = model_classes(mdl)
        if classes is not None:  # a classifier: test files of text/label rows, accuracy and MCC
            from pipeline.classification.evaluation import evaluate_classification
            from pipeline.classification.rows import load_labelled

            sets = dict(parse_data_arg(spec) for spec in data)
            result = evaluate_classification(mdl, tok, {t: load_labelled(p) for t, p in sets.items()}, classes,
                                             batch_size=batch_size, limit=limit)
        else:
            result = evaluate_tasks(mdl, tok, load_tasks(data), num_beams=num_beams, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, limit=limit, use_input=use_input)  # fmt: skip
        out_dir = Path(out) if out else (Path(adapter).resolve().parent / "eval" if adapter else Path("eval"))
        result["out_dir"] = str(out_dir)
        result["rank"] = rank
        if rank == 0:
            write_results(result, out_dir)
            if run_id:
                if not log_results(result, uri, run_id, out_dir, step=step):
                    log(f"warning: not everything reached MLflow run {run_id}")
                result["logged_to"] = {"tracking_uri": uri, "run_id": run_id}
        finished = True
        return result
    finally:
        if started:  # before the interpreter's teardown, which can abort a rank (pipeline.training.distributed)
            leave_process_group(together=finished)
