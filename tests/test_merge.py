"""`tsd merge`: an adapter folded into its base as a plain Hugging Face model folder.

The reference is stock PEFT on the untouched base (`PeftModel.from_pretrained`): the merged
folder, loaded by transformers alone, must give its logits. Adapters are made without training:
TSD layers on a tiny LLaMA, random LoRA factors, the switches run in one process (as
tests/test_export.py does), then `tsd.save_adapter`.

Tolerances (max |logit difference| against PEFT's unmerged forward, measured on these models,
logits of magnitude ~1-5):
  float32 base:  the merged weights equal PEFT's merge_and_unload bit for bit; logits within
                 1e-5 (measured 3.3e-6 to 4.8e-6: merged and unmerged forwards sum in different orders).
  bfloat16 base: every merged weight is W + scaling B A rounded ONCE to bfloat16 (within half a
                 bf16 ulp of the float64 value, plus float32 noise); logits within 0.15 of PEFT's
                 bf16 forward (measured 0.066 to 0.070 at logits up to ~4.3: bf16 activations in
                 both, rounded at different places; PEFT's own merge_and_unload is 0.070 from its
                 forward, and both are 0.05 to 0.08 from a float64 forward).
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from conftest import TARGETS, batch, clone, logits, make_base, randomize_lora, set_dash_scalars
from safetensors import safe_open

import tsd
from pipeline import merge as merge_module
from pipeline import merge_inputs  # every safetensors file of a merge is opened there
from pipeline.data.synthetic import make_encoder_dir, make_tokenizer
from pipeline.launch.cli import main as tsd_main
from pipeline.merge import merge_adapter

R, ALPHA, S = 4, 8.0, 3
BF16_LOGIT_TOL = 0.15


# ----------------------------------------------------------------------------- makers
def save_base(model, folder: Path, **save_kw) -> Path:
    """A base model folder as a user has one: weights, config, generation config, tokenizer."""
    model.save_pretrained(str(folder), **save_kw)
    make_tokenizer(["the quick brown fox jumps over the lazy dog"]).save_pretrained(str(folder))
    return folder


def make_adapter(base, method: str, folder: Path, base_dir: str | None, targets=TARGETS, modules_to_save=(),
                 task_type="CAUSAL_LM", extra_metadata=None, seed: int = 1) -> Path:
    """An adapter of `method` in its final phase with every tensor nonzero, no training: random
    LoRA, the switches in one process, random dash scalars."""
    model = clone(base)
    config = tsd.TSDConfig(method=method, r=R, alpha=ALPHA, dropout=0.0, targets=list(targets), switch_step=5,
                           num_directions=S, modules_to_save=list(modules_to_save))
    torch.manual_seed(123)
    tsd.inject(model, config)
    randomize_lora(model, seed=seed)
    if config.uses_init:
        tsd.run_switch(model, tsd.INIT, 5)
        randomize_lora(model, seed=seed + 1)  # the main phase moves A and B on
    if config.uses_dash:
        tsd.run_switch(model, tsd.DASH, 10 if config.uses_init else 5)
        set_dash_scalars(model, seed=seed + 2, scale=0.5)
    return tsd.save_adapter(model, folder, config, base_dir, task_type=task_type, extra_metadata=extra_metadata)


def peft_model(base, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(clone(base), str(adapter)).eval()


def load_merged(out: Path, auto=None):
    """The merged folder through transformers alone; nothing missing, nothing unexpected."""
    from transformers import AutoModelForCausalLM

    model, info = (auto or AutoModelForCausalLM).from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def file_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    return tensors


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (normal range), in float64."""
    eps = torch.finfo(torch.bfloat16).eps
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)))) * eps


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """One in-memory base and its folder per dtype (built once: the module's cases share them)."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_base(0).to(dtype)
        out[dtype] = (model, save_base(model, root / str(dtype)[6:]))
    return out


# ----------------------------------------------------------------------------- the merge is PEFT's
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["dash", "init", "tsd"])
def test_merged_folder_loads_alone_and_gives_peft_logits(method, dtype, bases, tmp_path):
    base, base_dir = bases[dtype]
    adapter = make_adapter(base, method, tmp_path / "adapter", str(base_dir))
    result = merge_adapter(adapter, tmp_path / "merged", progress=False)  # the base recorded in the adapter
    out = result.out

    # a plain model folder: the base's files, none of PEFT's or lora-tsd's
    assert sorted(os.listdir(out)) == sorted(os.listdir(base_dir))
    assert (out / "config.json").read_text() == (base_dir / "config.json").read_text()
    merged = file_tensors(out)
    assert {t.dtype for t in merged.values()} == {dtype}
    assert result.merged == 2 * len(TARGETS)

    ids = batch(5, bsz=2, seqlen=12)
    peft = peft_model(base, adapter)
    expected = logits(peft, ids)
    assert float((expected - logits(base, ids)).abs().max()) > 0.1  # the adapter is not trivial
    model = load_merged(out)
    assert model.dtype == dtype
    got = logits(model, ids)
    diff = float((got - expected).abs().max())
    print(f"{method} {dtype}: max |logit - PEFT logit| = {diff:.3g}")
    reference = peft.merge_and_unload().state_dict()
    if dtype == torch.float32:
        assert diff <= 1e-5
        for k, v in model.state_dict().items():  # PEFT's own merge, bit for bit
            assert torch.equal(v, reference[k]), k
    else:
        assert diff <= BF16_LOGIT_TOL
        _check_rounded_once(merged, base, adapter)


def _check_rounded_once(merged: dict, base, adapter: Path) -> None:
    """Each target weight is W + scaling B A (float64) rounded once to bf16: within half an ulp,
    plus the float32 accumulation's error (far below 1e-3 ulp here)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    originals = base.state_dict()
    worst = 0.0
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key:
                continue
            name = key[len("base_model.model."):].replace(".lora_A.weight", ".weight")
            A, B = f.get_tensor(key).double(), f.get_tensor(key.replace("lora_A", "lora_B")).double()
            exact = originals[name].double() + scaling * (B @ A)
            worst = max(worst, float(((merged[name].double() - exact).abs() / bf16_ulp(exact)).max()))
    assert worst <= 0.5 + 1e-3, f"{worst:.4f} bf16 ulp from W + scaling B A"


# ----------------------------------------------------------------------------- shards, ties, classifier
def test_sharded_base_round_trips_into_several_shards(bases, tmp_path):
    base, single_dir = bases[torch.float32]
    sharded_dir = save_base(base, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    adapter = make_adapter(base, "dash", tmp_path / "adapter", None)

    limit = 16_000
    rc = tsd_main(["merge", "--adapter", str(adapter), "--model", str(sharded_dir), "--out", str(tmp_path / "merged"),
                   "--max-shard-size", "16KB"])
    assert rc == 0
    out = tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 4 and all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in file_tensors(out).values())
    for p in shards:  # each at most the limit, unless one tensor alone is larger
        with safe_open(str(p), "pt") as fh:
            sizes = [fh.get_tensor(k).numel() * 4 for k in fh.keys()]
        assert sum(sizes) <= limit or len(sizes) == 1, (p.name, sizes)
    assert not (out / "model.safetensors").exists()

    whole = merge_adapter(adapter, tmp_path / "from-single", model=single_dir, progress=False).out
    a, b = file_tensors(out), file_tensors(whole)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = batch(6)
    torch.testing.assert_close(logits(load_merged(out), ids), logits(peft_model(base, adapter), ids), rtol=0, atol=1e-5)


def test_tied_embeddings_stay_tied_and_are_written_once(tmp_path):
    base = make_base(0, tie_word_embeddings=True)
    base_dir = save_base(base, tmp_path / "tied")
    adapter = make_adapter(base, "tsd", tmp_path / "adapter", str(base_dir))
    out = merge_adapter(adapter, tmp_path / "merged", progress=False).out
    keys = set(file_tensors(out))
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    model = load_merged(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = batch(7)
    torch.testing.assert_close(logits(model, ids), logits(peft_model(base, adapter), ids), rtol=0, atol=1e-5)


def test_classifier_adapter_merges_with_its_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from pipeline.classification.head import init_head

    encoder = make_encoder_dir(tmp_path / "encoder", texts=["the a movie film plot actor scene story was is very quite good bad"])

    def classifier(seed):
        model = AutoModelForSequenceClassification.from_pretrained(str(encoder), num_labels=3)
        init_head(model, seed)
        return model.eval()

    base = classifier(7)
    with torch.no_grad():  # a trained head: not what a fresh classifier starts from
        base.classifier.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
        base.classifier.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    labels = ["negative", "neutral", "positive"]
    adapter = make_adapter(base, "tsd", tmp_path / "adapter", str(encoder), targets=["query", "value"],
                           modules_to_save=["classifier", "score"], task_type="SEQ_CLS",
                           extra_metadata={"labels": json.dumps(labels)})

    result = merge_adapter(adapter, tmp_path / "merged", progress=False)
    assert result.heads == ["classifier.bias", "classifier.weight"]
    model = load_merged(result.out, AutoModelForSequenceClassification)
    assert [model.config.id2label[i] for i in range(3)] == labels
    assert model.config.architectures == ["BertForSequenceClassification"]
    ids = torch.tensor([[2, 5, 7, 9, 4, 3], [6, 8, 2, 2, 11, 5]])
    from peft import PeftModel

    with torch.no_grad():
        expected = PeftModel.from_pretrained(classifier(99), str(adapter)).eval()(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)



# ----------------------------------------------------------------------------- host memory
class LiveTensors:
    """Bytes of the tensors the merge holds: every tensor read from a safetensors file and every
    folded weight is counted from its creation until it is freed (weakref finalizers), so a merge
    that kept the whole model (or a whole shard list) alive would count all of it."""

    def __init__(self) -> None:
        self.live = self.peak = 0
        self.counted: weakref.WeakSet = weakref.WeakSet()

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor not in self.counted:
            size = tensor.untyped_storage().nbytes()
            self.counted.add(tensor)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._free, size)
        return tensor

    def _free(self, size: int) -> None:
        self.live -= size


class CountedFile:
    """safe_open's handle, with every tensor it hands out counted."""

    def __init__(self, inner, counter: LiveTensors) -> None:
        self.inner, self.counter = inner, counter

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.counter.track(self.inner.get_tensor(key))

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_host_memory_stays_near_one_shard(tmp_path, monkeypatch):
    base = make_base(0, num_hidden_layers=8, hidden_size=64, intermediate_size=128, vocab_size=256)
    base_dir = save_base(base, tmp_path / "base")
    adapter = make_adapter(base, "dash", tmp_path / "adapter", str(base_dir))
    sizes = [p.numel() * p.element_size() for p in base.state_dict().values()]
    model_bytes, largest, limit = sum(sizes), max(sizes), 100_000

    counter = LiveTensors()
    real_open, real_fold = merge_inputs.safe_open, merge_module.fold_update
    monkeypatch.setattr(merge_inputs, "safe_open", lambda *a, **k: CountedFile(real_open(*a, **k), counter))
    monkeypatch.setattr(merge_module, "fold_update", lambda *a: counter.track(real_fold(*a)))
    result = merge_adapter(adapter, tmp_path / "merged", max_shard_size=limit, progress=False)

    # one pending shard, plus the weight being folded (read and folded copies) and its factors
    bound = limit + 3 * largest
    print(f"peak {counter.peak} B of tensors alive; bound {bound} B (shard {limit} + 3 x largest tensor {largest}); "
          f"model {model_bytes} B in {len(result.shards)} shards")
    assert model_bytes > 4 * bound  # the bound would catch a merge that held the whole model
    assert limit // 2 <= counter.peak <= bound
    assert counter.live == 0 or counter.live <= largest  # nothing kept after the merge


# ----------------------------------------------------------------------------- bad input
def _no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".merging-" in p.name]


BAD_INPUT = {
    "missing-adapter": ("adapter-that-is-not-there", {}, "is not a folder"),
    "no-recorded-base": ("adapter-no-base", {}, "--model is required"),
    "recorded-base-gone": ("adapter-gone-base", {}, "is not a folder here; give the base model folder with --model"),
    "out-not-empty": ("adapter", {"out_has_file": True}, "exists and is not empty"),
    "base-without-safetensors": ("adapter", {"model": "bin-only"}, "holds no safetensors weights"),
    "another-base": ("adapter", {"model": "other"}, "is --model the base this adapter was trained on?"),
    "bad-shard-size": ("adapter", {"shard": "2 bananas"}, "--max-shard-size: '2 bananas' is not a size"),
}


@pytest.fixture(scope="module")
def bad_inputs(bases, tmp_path_factory):
    """The folders the bad-input cases point at."""
    root = tmp_path_factory.mktemp("bad")
    base, base_dir = bases[torch.float32]
    make_adapter(base, "dash", root / "adapter", str(base_dir))
    make_adapter(base, "dash", root / "adapter-no-base", None)
    make_adapter(base, "dash", root / "adapter-gone-base", str(root / "deleted-base"))
    (root / "bin-only").mkdir()
    (root / "bin-only/config.json").write_text((base_dir / "config.json").read_text())
    torch.save({}, root / "bin-only/pytorch_model.bin")
    save_base(make_base(0, intermediate_size=64), root / "other")
    return root


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(case, bad_inputs, tmp_path, capsys):
    adapter, opts, message = BAD_INPUT[case]
    out = tmp_path / "merged"
    if opts.get("out_has_file"):
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    argv = ["merge", "--adapter", str(bad_inputs / adapter), "--out", str(out)]
    argv += ["--model", str(bad_inputs / opts["model"])] if "model" in opts else []
    argv += ["--max-shard-size", opts["shard"]] if "shard" in opts else []
    capsys.readouterr()
    rc = tsd_main(argv)
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tsd: error: ") and message in lines[0], captured.err
    assert captured.out == ""
    assert sorted(os.listdir(out)) == ["keep.txt"] if opts.get("out_has_file") else not out.exists()
    assert _no_leftovers(tmp_path) == []


def test_a_merge_that_fails_while_writing_leaves_no_folder(bases, tmp_path, monkeypatch):
    base, base_dir = bases[torch.float32]
    adapter = make_adapter(base, "dash", tmp_path / "adapter", str(base_dir))
    real_save, calls = merge_module.save_file, []

    def disk_full_on_the_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(merge_module, "save_file", disk_full_on_the_third_shard)
    with pytest.raises(OSError, match="No space left"):
        merge_adapter(adapter, tmp_path / "merged", max_shard_size="10KB", progress=False)
    assert len(calls) == 3
    assert not (tmp_path / "merged").exists() and _no_leftovers(tmp_path) == []
