"""Which base weights a run trained on (issue 24, item 6): pipeline.fingerprint.

Unit: the fingerprint of a model folder (same folder -> same digest; a changed sampled byte, header,
config or a missing shard -> another digest naming the file; .bin-only and sharded folders; a 16 GiB
file costs ~1 MiB of reads), the message, and the per-node comparison on fake per-rank fingerprints.
One 2-rank run (torchrun, CPU) serves the end-to-end checks: its run folder and every checkpoint tag
record the base; a rerun (tsd train) and a resume (torchrun) against modified weights at the same
model.path are refused with exit 2 and the message; a checkpoint without a fingerprint still resumes.
"""

import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from proc_group import BIN, ROOT, child_env, crashed_after, make_tiny_model, tiny_config, torchrun_worker
from safetensors.torch import save_file

from pipeline.fingerprint import (SAMPLE_WINDOWS, WINDOW, BaseMismatchError, Fingerprint, agree_on_base,
                                  check_same_base, differing_files, fingerprint, rank_mismatch, sample_offsets)
from pipeline.run_folder import BASE_FILE, check_rerun


def _flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _data_start(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("fp") / "model")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- the fingerprint
def test_the_same_weights_give_the_same_digest_wherever_they_are(tiny_model, tmp_path):
    a = fingerprint(tiny_model)
    assert a == fingerprint(tiny_model) and len(a.digest) == 16
    assert set(a.files) == {"model.safetensors", "config.json"}
    assert fingerprint(_copy(tiny_model, tmp_path / "elsewhere")) == a  # the path is not part of it
    assert Fingerprint.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert Fingerprint.from_dict(None) is None and Fingerprint.from_dict({"digest": 3}) is None


def test_one_changed_byte_in_a_sampled_window_changes_the_digest_and_names_the_file(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.arange(1 << 20, dtype=torch.float32)}, str(folder / "model.safetensors"))  # 4 MiB data
    before = fingerprint(folder)
    weights = folder / "model.safetensors"
    start = _data_start(weights)
    windows = sample_offsets(start, weights.stat().st_size - start)
    assert len(windows) == SAMPLE_WINDOWS and windows[0][0] == start
    assert windows[-1][0] + WINDOW == weights.stat().st_size  # first and last bytes included
    _flip(weights, windows[7][0] + 123)
    after = fingerprint(folder)
    assert after.digest != before.digest
    assert differing_files(before, after) == ["model.safetensors (sampled bytes)"]
    # The documented limit: a byte between the windows, in a file of the same size and header, is not seen.
    _flip(weights, windows[7][0] + WINDOW + 10)
    assert fingerprint(folder).digest == after.digest


def test_a_changed_header_size_or_config_changes_the_digest(tiny_model, tmp_path):
    before = fingerprint(tiny_model)
    folder = _copy(tiny_model, tmp_path / "header")
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    n = _data_start(weights)
    header = raw[8:n]
    assert b'"F32"' in header
    weights.write_bytes(raw[:8] + header.replace(b'"F32"', b'"I32"', 1) + raw[n:])  # same length, another dtype
    assert differing_files(before, fingerprint(folder)) == ["model.safetensors (header)"]

    folder = _copy(tiny_model, tmp_path / "truncated")
    with (folder / "model.safetensors").open("r+b") as f:
        f.truncate(len(raw) - 4)
    assert differing_files(before, fingerprint(folder)) == ["model.safetensors (size, sampled bytes)"]

    folder = _copy(tiny_model, tmp_path / "config")
    config = json.loads((folder / "config.json").read_text())
    config["transformers_version"], config["_name_or_path"] = "0.0.1", "/somewhere/else"  # who wrote it: ignored
    (folder / "config.json").write_text(json.dumps(config, indent=7))
    assert fingerprint(folder) == before
    config["rms_norm_eps"] = 1e-3
    (folder / "config.json").write_text(json.dumps(config))
    assert differing_files(before, fingerprint(folder)) == ["config.json (contents)"]


def test_sharded_safetensors_with_an_index_and_a_missing_shard(tmp_path):
    from pipeline.data.synthetic import make_model_dir

    folder = make_model_dir(tmp_path / "sharded", max_shard_size="40KB")
    before = fingerprint(folder)
    shards = sorted(n for n in before.files if n.endswith(".safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    (folder / shards[-1]).unlink()  # a half-synced copy
    after = fingerprint(folder)
    assert after.digest != before.digest and differing_files(before, after) == [f"{shards[-1]} (missing here)"]


def test_a_bin_only_folder_is_fingerprinted_by_sizes_and_sampled_bytes(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    torch.save({"w": torch.randn(64, 64)}, folder / "pytorch_model.bin")
    before = fingerprint(folder)
    assert set(before.files["pytorch_model.bin"]) == {"size", "sample"}
    _flip(folder / "pytorch_model.bin", (folder / "pytorch_model.bin").stat().st_size // 2)
    assert differing_files(before, fingerprint(folder)) == ["pytorch_model.bin (sampled bytes)"]


def test_a_16_gib_file_costs_about_one_mib_of_reads(tmp_path):
    folder = tmp_path / "large"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    numel = 4 << 30  # 16 GiB of float32, sparse: nothing is written but the header
    header = json.dumps({"w": {"dtype": "F32", "shape": [numel], "data_offsets": [0, 4 * numel]}}).encode()
    with (folder / "model.safetensors").open("wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 4 * numel)
    t0 = time.perf_counter()
    fp = fingerprint(folder)
    seconds = time.perf_counter() - t0
    assert fp.bytes_read <= 8 + len(header) + SAMPLE_WINDOWS * WINDOW + 100
    print(f"fingerprint of a 16 GiB safetensors file: {seconds * 1e3:.1f} ms, {fp.bytes_read / 2**20:.2f} MiB read")


# ----------------------------------------------------------------------------- the checks
def _fake(digest: str, sample: str) -> Fingerprint:
    return Fingerprint(digest, {"model.safetensors": {"size": 10, "header": "h", "sample": sample},
                                "config.json": {"content": "c"}})


def test_check_same_base_names_both_fingerprints_the_files_and_what_to_do():
    run, other = _fake("aaaa", "s1"), _fake("bbbb", "s2")
    assert check_same_base("/m", None, other, "x") is False  # an older run: nothing to check against
    assert check_same_base("/m", run, run, "x") is True
    with pytest.raises(BaseMismatchError) as e:
        check_same_base("/m", run, other, "/run/base_fingerprint.json")
    assert str(e.value) == (
        "model.path /m is not the base this run was trained on: its fingerprint is bbbb, /run/base_fingerprint.json "
        "records aaaa (differing files: model.safetensors (sampled bytes)); point model.path at the original weights, "
        "or start a new run (--fresh / another name)")
    assert isinstance(e.value, ValueError)  # every launcher ends a ValueError with exit 2


def test_a_node_whose_copy_differs_is_named_with_its_ranks_and_files():
    good, bad = _fake("aaaa", "s1"), _fake("bbbb", "s2")
    hosts = {0: "a@10.0.0.1", 1: "a@10.0.0.1", 2: "b@10.0.0.2", 3: "b@10.0.0.2"}
    assert rank_mismatch("/m", [good] * 4, hosts) is None
    msg = rank_mismatch("/m", [good, good, bad, bad], hosts)
    assert msg == (
        "model.path /m is not the same on every node: ranks 0, 1 on a@10.0.0.1 read fingerprint aaaa, ranks 2, 3 on "
        "b@10.0.0.2 read bbbb (differing files: model.safetensors (sampled bytes)); every node must hold the same "
        "weights at model.path: copy the folder again to the nodes named (or put it on storage every node shares), "
        "then rerun")
    # rank 0's copy is the reference, whichever is the majority
    msg = rank_mismatch("/m", [bad, good, good, good], hosts)
    assert ("rank 0 on a@10.0.0.1 read fingerprint bbbb, rank 1 on a@10.0.0.1 and ranks 2, 3 on b@10.0.0.2 read aaaa "
            "(differing files: model.safetensors (sampled bytes))") in msg


def test_agree_on_base_without_a_process_group_is_this_copys_fingerprint(tiny_model):
    assert agree_on_base(tiny_model) == fingerprint(tiny_model)


def test_set_up_checks_the_tag_then_the_run_folder_and_lets_an_old_checkpoint_resume(tiny_model, tmp_path, capsys):
    """pipeline.training.base_check on one process (the all-gather returns this rank's own)."""
    from pipeline.run_folder import record_base
    from pipeline.training.base_check import check_base
    from pipeline.training.nodes import Node
    from pipeline.training.reshard import Layout

    nodes, run = [Node("h", "10.0.0.1", [0])], tmp_path / "run"
    run.mkdir()
    base = fingerprint(tiny_model)
    other = _fake("bbbb", "s2")
    assert check_base(str(tiny_model), run, None, None, nodes) == base  # a new run: nothing to compare with
    assert check_base(str(tiny_model), run, "step4", Layout(2, base=base.to_dict()), nodes) == base
    with pytest.raises(BaseMismatchError, match=f"its fingerprint is {base.digest}, checkpoint "
                                                f"{run}/checkpoints/step4/layout.json records bbbb"):
        check_base(str(tiny_model), run, "step4", Layout(2, base=other.to_dict()), nodes)
    # a tag from before fingerprints existed: resumes, says the base could not be checked ...
    capsys.readouterr()
    assert check_base(str(tiny_model), run, "step4", Layout(2), nodes) == base
    said = capsys.readouterr().err
    assert "the base weights could not be checked: checkpoint step4 was written before base fingerprints" in said
    # ... unless the run folder recorded it since (an old run resumed once with this version)
    record_base(run, other, replace=False)
    with pytest.raises(BaseMismatchError, match=f"{run}/{BASE_FILE} records bbbb"):
        check_base(str(tiny_model), run, "step4", Layout(2), nodes)
    record_base(run, base, replace=False)  # kept: a resume never replaces the run's record
    assert json.loads((run / BASE_FILE).read_text())["digest"] == "bbbb"
    record_base(run, base, replace=True)  # a run that starts from step 0 does
    assert json.loads((run / BASE_FILE).read_text())["digest"] == base.digest


# ----------------------------------------------------------------------------- one real run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-rank LoRA-Dash run of the tiny model with a checkpoint every 2 of its 5 steps."""
    wd = tmp_path_factory.mktemp("base")
    make_tiny_model(wd / "model")
    cfg = tiny_config(wd / "model", wd / "runs", "base")
    cfg["train"].update(checkpoint_every=2, keep_checkpoints=None)
    cfg["tracking"].update(offline=True)
    path = wd / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = torchrun_worker(path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return wd, path, cfg


@contextlib.contextmanager
def other_weights(model: Path):
    """model's folder holds other weights (one flipped byte in model.safetensors) until the block ends."""
    keep = model.with_name(model.name + ".orig")
    shutil.copytree(model, keep)
    try:
        _flip(model / "model.safetensors", (model / "model.safetensors").stat().st_size - 1)
        yield
    finally:
        shutil.rmtree(model)
        keep.rename(model)


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_the_run_folder_and_every_checkpoint_record_the_base(trained):
    wd, _, _ = trained
    base = fingerprint(wd / "model").to_dict()
    assert json.loads((wd / "runs/base" / BASE_FILE).read_text()) == base
    tags = sorted(p for p in (wd / "runs/base/checkpoints").iterdir() if p.is_dir())
    assert [t.name for t in tags] == ["step2", "step4", "step5"]
    for tag in tags:
        assert json.loads((tag / "layout.json").read_text())["base_fingerprint"] == base


@pytest.mark.slow
def test_a_rerun_on_other_weights_is_refused_before_anything_starts(trained):
    wd, path, cfg = trained
    before = _files(wd / "runs/base")
    recorded = fingerprint(wd / "model").digest
    with other_weights(wd / "model"):
        now = fingerprint(wd / "model").digest
        cli = subprocess.run([str(BIN / "tsd"), "train", str(path)], cwd=ROOT, env=child_env(), capture_output=True,
                             text=True, timeout=300)
        assert cli.returncode == 2, cli.stderr[-3000:]
        err = [ln for ln in cli.stderr.splitlines() if "error" in ln]
        assert err == [
            f"tsd: error: model.path {wd / 'model'} is not the base this run was trained on: its fingerprint is {now}, "
            f"{wd / 'runs/base' / BASE_FILE} records {recorded} (differing files: model.safetensors (sampled bytes)); "
            f"point model.path at the original weights, or start a new run (--fresh / another name)"]
        assert "Started a local Ray" not in cli.stderr
        # --fresh starts a new run on them instead (here on a copy of the finished run, in process)
        from pipeline.config import load_config
        from pipeline.paths import resolve_paths

        shutil.copytree(wd / "runs/base", wd / "runs/again")
        again = resolve_paths(load_config(str(path), ["name=again"]))
        with pytest.raises(BaseMismatchError):
            check_rerun(again)
        assert check_rerun(again, fresh=True).kind == "new" and not (wd / "runs/again").exists()
    assert _files(wd / "runs/base") == before


@pytest.mark.slow
def test_a_resume_on_other_weights_stops_every_rank_naming_the_checkpoint(trained):
    """A run folder with checkpoints but no run-folder record (copied checkpoints; a Ray worker
    restart never passes check_rerun either): the ranks' set-up refuses it before loading."""
    wd, _, cfg = trained
    crashed_after(wd / "runs/base", wd / "runs/copied", 4)
    path = wd / "copied.yaml"
    path.write_text(yaml.safe_dump({**cfg, "name": "copied"}))
    recorded = fingerprint(wd / "model").digest
    with other_weights(wd / "model"):
        proc = torchrun_worker(path)
    assert proc.returncode != 0 and proc.stderr.count("exitcode  : 2") == 2  # torchrun's summary: both ranks exit 2
    tag = wd / "runs/copied/checkpoints/step4/layout.json"
    lines = [ln for ln in proc.stderr.splitlines() if "error: model.path" in ln]
    assert sorted(ln.split("]")[0] for ln in lines) == ["[tsd rank 0", "[tsd rank 1"], proc.stderr[-4000:]  # each rank
    assert all(f"checkpoint {tag} records {recorded}" in ln and "model.safetensors (sampled bytes)" in ln
               and "--fresh / another name" in ln for ln in lines)
    assert not (wd / "runs/copied/nodes.json").exists()  # stopped in set-up, before the model was loaded
