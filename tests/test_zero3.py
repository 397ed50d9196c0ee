"""2-rank DeepSpeed ZeRO-3 on CPU (gloo): the sharded switch against the single-process method.

tests/dist/zero3_switch.py runs under torchrun; this file checks what it wrote against
independent references: tsd's single-process selection on the same gathered weights, the plan,
stock PEFT loading the exported adapter, and the original base model.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from proc_group import child_env, run_group
import torch
from safetensors.torch import load_file

import tsd
from tsd.directions import layer_directions
from tsd.plan import shard_plan
from tsd.switch import switch_items

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 400) -> subprocess.CompletedProcess:
    env = child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
    proc = run_group(cmd, cwd=ROOT, env=env, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from pipeline.data.synthetic import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("model") / "tiny", texts=["a b c d e f g h i j k l m n o p"])


@pytest.fixture(scope="module", params=["dash", "tsd"])
def run(request, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"z3_{request.param}")
    _torchrun(ROOT / "tests/dist/zero3_switch.py", str(tiny_dir), str(out), request.param)
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return {"method": request.param, "out": out, "ranks": ranks, "infos": infos, "model_dir": tiny_dir}


def _reference_model(model_dir, method):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = tsd.TSDConfig(method=method, r=4, alpha=8, dropout=0.0, switch_step=1, num_directions=3)
    tsd.inject(model, cfg)
    return model, cfg


def test_base_weights_are_partitioned(run):
    for info in run["infos"]:
        assert info["data_numel"] == 0  # the local tensor is empty under ZeRO-3
        assert 0 < info["local_numel"] < info["full_numel"]


def test_each_rank_decomposes_only_its_planned_share(run):
    model, _ = _reference_model(run["model_dir"], run["method"])
    for kind in run["infos"][0]["decomposed"]:
        items = switch_items(model, kind)
        owner = shard_plan(items, 2)
        for r, info in enumerate(run["infos"]):
            expected = [it.name for it, o in zip(items, owner) if o == r]
            assert sorted(info["decomposed"][kind]) == sorted(expected)
        a, b = (set(info["decomposed"][kind]) for info in run["infos"])
        assert not a & b and a | b == {it.name for it in items}


@pytest.mark.parametrize("rank", [0, 1])
def test_distributed_selection_equals_single_process_reference(run, rank):
    t = run["ranks"][rank]
    model, cfg = _reference_model(run["model_dir"], run["method"])
    for kind in run["infos"][0]["decomposed"]:
        for name, layer in tsd.tsd_layers(model):
            count = cfg.num_directions if kind == "dash" else cfg.r
            # LoRA-TSD's dash switch excludes the subspaces of LoRA-Init's factors (B0, A0).
            exclude = None
            if kind == "dash" and run["method"] == "tsd":
                exclude = (t[f"after_init.{name}.B"], t[f"after_init.{name}.A"])
            ref = layer_directions(
                name, t[f"before_{kind}.{name}.W"], t[f"before_{kind}.{name}.A"], t[f"before_{kind}.{name}.B"],
                layer.scaling, count, exclude=exclude,
            )
            got_idx = t[f"sel_{kind}.{name}.indices"]
            assert torch.equal(got_idx, ref.indices), f"{kind} {name}: {got_idx} vs {ref.indices}"
            # Projectors u_i v_i^T are sign-invariant; raw singular vectors are not.
            U, V = t[f"sel_{kind}.{name}.U"], t[f"sel_{kind}.{name}.V"]
            for i in range(count):
                got = torch.outer(U[:, i], V[:, i])
                want = torch.outer(ref.U[:, i], ref.V[:, i])
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_svd_cache_under_zero3_warm_switch_assembles_no_weight_and_selects_the_same(run):
    from tsd.svd_cache import SVDCache, weight_key

    cold = [info["cache"]["cold"] for info in run["infos"]]
    warm = [info["cache"]["warm"] for info in run["infos"]]
    n_items = sum(c["owned"] for c in cold)
    assert [c["hits"] for c in cold] == [0, 0]
    assert all(c["weights_gathered"] == n_items for c in cold)  # each rank takes part in every gather
    assert [w["hits"] for w in warm] == [w["owned"] for w in warm] and sum(w["owned"] for w in warm) == n_items
    assert [w["weights_gathered"] for w in warm] == [0, 0]
    for t in run["ranks"]:
        names = [k.split(".", 1)[1].rsplit(".", 1)[0] for k in t if k.startswith("sel_warm.") and k.endswith(".indices")]
        assert len(names) == n_items
        for name in names:
            assert torch.equal(t[f"sel_warm.{name}.indices"], t[f"sel_dash.{name}.indices"]), name
            assert torch.equal(t[f"sel_cold.{name}.indices"], t[f"sel_dash.{name}.indices"]), name
            torch.testing.assert_close(t[f"sel_warm.{name}.rates"], t[f"sel_cold.{name}.rates"])
    # Entries are stored under the whole weight's content key, so a run with another world size
    # (here: a single process hashing the gathered weight) finds them.
    cache = SVDCache(run["out"] / "svd-cache")
    t = run["ranks"][0]
    for name in names:
        assert cache.path(weight_key(t[f"before_dash.{name}.W"], "float32")).is_file(), name
    assert len(list(cache.folder.glob("*.alias"))) == n_items


def test_dash_state_identical_across_ranks_and_trained(run):
    r0, r1 = run["ranks"]
    scalar_keys = [k for k in r0 if k.startswith("scalars.")]
    assert scalar_keys
    for k in scalar_keys:
        assert torch.equal(r0[k], r1[k]), k
        assert r0[k].abs().sum() > 0, f"{k} did not move after the switch"
    for k in (k for k in r0 if k.startswith("buffers.")):
        assert torch.equal(r0[k], r1[k])
    assert torch.equal(r0["logits"], r1["logits"])


def test_exported_adapter_loads_in_stock_peft_with_matching_logits(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = run["out"] / "adapter"
    size = (adapter / "adapter_model.safetensors").stat().st_size
    assert size > 1000, f"adapter file is {size} bytes (the ZeRO-3 empty-adapter failure)"
    base = AutoModelForCausalLM.from_pretrained(str(run["model_dir"]), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    t = run["ranks"][0]
    with torch.no_grad():
        logits = peft_model(input_ids=t["input_ids"]).logits
    torch.testing.assert_close(logits, t["logits"], atol=2e-4, rtol=1e-4)


def test_lora_init_under_zero3_keeps_output_and_optimizer_follows_the_edit(run):
    if run["method"] != "tsd":
        pytest.skip("LoRA-Init only in the tsd run")
    from transformers import AutoModelForCausalLM

    t = run["ranks"][0]
    base = AutoModelForCausalLM.from_pretrained(str(run["model_dir"]), dtype=torch.float32).eval()
    with torch.no_grad():
        want = base(input_ids=t["input_ids"]).logits
    # Output equals the ORIGINAL base (the pre-launch update is discarded) at the re-init.
    torch.testing.assert_close(t["logits_after_init"], want, atol=2e-4, rtol=1e-4)
    model, _ = _reference_model(run["model_dir"], "tsd")
    for name, layer in tsd.tsd_layers(model):
        W0, W1 = t[f"before_init.{name}.W"], t[f"after_init.{name}.W"]
        A1, B1 = t[f"after_init.{name}.A"], t[f"after_init.{name}.B"]
        torch.testing.assert_close(W0 - W1, layer.scaling * B1 @ A1, atol=1e-5, rtol=1e-4)
        # Training after the re-init continues from the new A (the fp32 master copy was updated);
        # a stale master copy would pull A back towards its pre-init value.
        A0, A2 = t[f"before_init.{name}.A"], t[f"trained_after_init.{name}.A"]
        assert (A2 - A1).norm() < 0.5 * (A2 - A0).norm(), name


LAYOUTS = ["sharded-files", "base-model-names", "bin-file"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """One 3-rank launch loads a folder of each layout (tests/dist/partitioned_load.py): layout ->
    (the files' tensors, the gathered ones, the ranks' info, this load's log)."""
    from safetensors.torch import save_file as save

    from pipeline.data.synthetic import make_model_dir

    root = tmp_path_factory.mktemp("layouts")
    wants, entries = {}, []
    for layout in LAYOUTS:
        mdir = make_model_dir(root / layout / "m", texts=["a b c d e f g h i j k l m n o p q"], hidden_size=40,
                              intermediate_size=50, max_shard_size="20KB", tie_word_embeddings=True)
        files = sorted(mdir.glob("model*.safetensors"))
        assert len(files) > 1
        want = {}
        for f in files:
            want.update(load_file(str(f)))
        if layout != "sharded-files":
            for f in files:
                f.unlink()
            (mdir / "model.safetensors.index.json").unlink()
        if layout == "base-model-names":
            save({**{k.removeprefix("model."): v for k, v in want.items()}, "x.gamma": torch.ones(2)},
                 str(mdir / "model.safetensors"))
        elif layout == "bin-file":
            torch.save(want, mdir / "pytorch_model.bin")
        wants[layout] = want
        entries.append(f"{mdir}={root / layout}" + ("=whole" if layout == "bin-file" else ""))
    proc = _torchrun(ROOT / "tests/dist/partitioned_load.py", *entries, nproc=3)
    logs = proc.stderr.split("=== load ")  # rank 0 logs to stderr, each load after its marker
    out = {}
    for layout in LAYOUTS:
        log = next(part for part in logs if part.startswith(str(root / layout / "m")))
        out[layout] = (wants[layout], load_file(str(root / layout / "loaded.safetensors")),
                       json.loads((root / layout / "info.json").read_text()), log)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_rank_loads_only_its_slices_and_gets_the_files_weights(loaded, layout):
    """3 ranks (sizes the world does not divide), tied input/output embeddings, weights in
    several files: every parameter gathered after the partitioned load equals the file's tensor
    bit for bit; also with names saved from the base model (no "model." prefix) and a stray
    key. A folder of .bin weights goes through transformers' path, with a warning, as exact."""
    want, got, info, log = loaded[layout]
    assert ("WARNING: loading" in log) == (layout == "bin-file")
    assert not info["training"]
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert "lm_head.weight" not in want  # tied: the files hold the embedding once,
    assert torch.equal(got["lm_head.weight"], want["model.embed_tokens.weight"])  # and the output layer is it
    assert max(info["local"].values()) < max(t.numel() for t in want.values())
