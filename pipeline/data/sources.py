"""Where training rows come from, read through HF `datasets`.

An entry of `data.train` names one of:

  a file      .json (one JSON list) or .jsonl (one object a line): the LLM-Adapters layout, or the
              labelled rows of a classifier; .csv (a header row, every cell text); .parquet.
              Any other suffix is read as JSON/JSONL, as before.
  a folder    written by `Dataset.save_to_disk` (or a `DatasetDict`'s, whose `train` split is used).
  a hub name  `hub:NAME`, `hub:NAME:CONFIG`, each optionally `@SPLIT` (default train), loaded with
              `datasets.load_dataset`. It resolves only where the local Hugging Face cache has it
              when HF_HUB_OFFLINE=1 is set (as on machines without the hub).

`read` gives the rows as an Arrow-backed `datasets.Dataset`, `fingerprint` what identifies the
rows cheaply (path, size and modification time; for a hub dataset its cached revision's
fingerprint), which keys the tokenized cache (pipeline.data.cache). The rows are not checked
here: the row rules and their messages belong to pipeline.data.tasks and pipeline.classification.rows.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets

from pipeline.errors import DataError

HUB_PREFIX = "hub:"
SUFFIX_FORMAT = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DATASET_FOLDER_FILES = ("state.json", "dataset_dict.json")  # what save_to_disk writes

datasets.disable_progress_bars()  # the pipeline logs its own one line per build (pipeline.data.cache)
# Its read errors become the project's messages (pipeline.data.training_set): no second, raw report.
datasets.logging.set_verbosity(datasets.logging.CRITICAL)


@dataclass(frozen=True)
class Source:
    entry: str  # as written in data.train (paths already absolute: pipeline.paths)
    format: str  # json | csv | parquet | folder | hub
    path: Path | None = None  # files and folders
    name: str | None = None  # hub: the dataset's name, its config and split
    config: str | None = None
    split: str = "train"

    def __str__(self) -> str:
        return self.entry


def is_hub_name(entry: str) -> bool:
    return entry.startswith(HUB_PREFIX)


def is_dataset_folder(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in DATASET_FOLDER_FILES)


def parse(entry: str) -> Source:
    """What `entry` names (nothing is read)."""
    if is_hub_name(entry):
        spec, at, split = entry[len(HUB_PREFIX):].rpartition("@") if "@" in entry else (entry[len(HUB_PREFIX):], "", "")
        name, _, config = spec.partition(":")
        if not name:
            raise DataError(f"{entry}: expected hub:NAME, hub:NAME:CONFIG, optionally @SPLIT")
        return Source(entry, "hub", name=name, config=config or None, split=split or "train")
    p = Path(entry)
    if p.is_dir():
        return Source(entry, "folder", path=p)
    return Source(entry, SUFFIX_FORMAT.get(p.suffix.lower(), "json"), path=p)


def read(source: Source, scratch: Path) -> datasets.Dataset:
    """The rows of `source` as a Dataset; `scratch` takes the Arrow copy `datasets` makes of a
    json, csv or parquet file (the caller deletes it; folders and hub datasets are mapped in place).
    Raises what `datasets` raises for a file it cannot read (the callers then let the project's
    own parser name the problem), FileNotFoundError for a missing file, DataError for a folder or
    hub name that holds no usable split."""
    if source.format == "hub":
        return _read_hub(source)
    p = source.path
    if not p.exists():
        raise FileNotFoundError(f"{p}: data file not found")
    if source.format == "folder":
        return _read_folder(source)
    cache = str(scratch)
    if source.format == "csv":
        # Every cell is text (no number or NA guessing): a label cell of digits is a class id and any
        # other a class name, as the project's own CSV reader decides (pipeline.classification.rows).
        # Column names are stripped of spaces, as there too.
        header = _csv_header(p)
        features = datasets.Features({c: datasets.Value("string") for c in header})
        return datasets.load_dataset("csv", data_files=str(p), split="train", cache_dir=cache, features=features,
                                     header=0, names=header, encoding="utf-8-sig", keep_default_na=False,
                                     na_filter=False)
    return datasets.load_dataset(source.format, data_files=str(p), split="train", cache_dir=cache)


def _csv_header(p: Path) -> list[str]:
    with open(p, encoding="utf-8-sig", newline="") as f:
        return [h.strip() for h in next(csv.reader(io.StringIO(f.readline(), newline="")))]


def _read_folder(source: Source) -> datasets.Dataset:
    p = source.path
    if not is_dataset_folder(p):
        raise DataError(f"{p}: is a folder without a dataset saved by Dataset.save_to_disk (no "
                        f"{' or '.join(DATASET_FOLDER_FILES)}); expected a data file or such a folder")
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if source.split not in ds:
            raise DataError(f"{p}: holds the splits {', '.join(ds)}, not {source.split!r}; name one as {p}/SPLIT")
        ds = ds[source.split]
    return ds


def _read_hub(source: Source) -> datasets.Dataset:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        return datasets.load_dataset(source.name, source.config, split=source.split)
    except (OSError, ValueError) as e:  # not found, not cached while offline, no such config or split
        where = (f"HF_HUB_OFFLINE is set, so only datasets already in the local Hugging Face cache "
                 f"({datasets.config.HF_DATASETS_CACHE}) load; load it once where the hub is reachable, or give a "
                 f"local file" if offline else "check the name, config and split")
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{source.entry}: cannot load {source.name!r}"
                        f"{f' config {source.config!r}' if source.config else ''} split {source.split!r} from the "
                        f"Hugging Face hub ({type(e).__name__}: {first}); {where}") from None


def fingerprint(source: Source) -> dict:
    """What identifies the rows of `source` for the tokenized cache: a file's resolved path, size and
    modification time (ns); each file of a folder; a hub dataset's name, config, split and the
    fingerprint `datasets` gives its cached revision."""
    if source.format == "hub":
        return {"hub": source.name, "config": source.config, "split": source.split,
                "fingerprint": _read_hub(source)._fingerprint}
    p = source.path.resolve()
    if not p.exists():
        raise FileNotFoundError(f"{source.path}: data file not found")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {"folder": str(p), "split": source.split,
                "files": [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}
    st = p.stat()
    return {"file": str(p), "format": source.format, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def rows(source: Source) -> Iterator[dict]:
    """Every row of `source` as a dict, read through `datasets` into a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="tsd-rows-") as scratch:
        ds = read(source, Path(scratch))
        yield from iter_rows(ds)


def iter_rows(ds: datasets.Dataset, batch_size: int = 4096) -> Iterator[dict]:
    """The rows of `ds` as dicts, converted a batch at a time."""
    names = ds.column_names
    for batch in ds.iter(batch_size=batch_size):
        for values in zip(*(batch[n] for n in names)):
            yield dict(zip(names, values))
