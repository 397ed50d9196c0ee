"""Secrets for Ray jobs: never in the job's runtime environment, which Ray shows in its dashboard,
its job API and `ray job list`; in a file on the cluster's storage that the job reads instead.

    JOB_ENV='{"TSD_ENV_FILE": "/shared/secrets.env"}' launch/ray_submit.sh CONFIG

`TSD_ENV_FILE` names a file of `KEY=VALUE` lines (# comments, blank lines and `export ` allowed),
e.g. `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD` for a tracking server with auth, or
`HF_TOKEN`. The path is not a secret; `tsd train` (the job's driver) and every Ray Train worker
read the file at start, so the values reach the processes that need them without passing through
Ray. Variables already set in the environment win. `launch/ray_submit.sh` runs `check_job_env`
first: a JOB_ENV key that names a secret, or a value holding a URI password, is refused.

    python -m pipeline.launch.job_env 'JSON'    # exit 2 with one line if JSON carries a secret
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pipeline.tracking.secrets import is_secret_key, mask_secrets

ENV_FILE = "TSD_ENV_FILE"


def check_job_env(text: str) -> dict:
    """The JOB_ENV JSON object, refused (ValueError, one line) when it is not an object of strings
    or carries a secret (a secret-named key, or a value with a password in a URI)."""
    try:
        env = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"JOB_ENV is not valid JSON ({e.msg} at character {e.pos}); e.g. '{{\"HF_HOME\": \"/shared/hf\"}}'")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("JOB_ENV must be a JSON object of string values, e.g. '{\"HF_HOME\": \"/shared/hf\"}'")
    for key, value in env.items():
        if is_secret_key(key) or mask_secrets(value) != value:
            raise ValueError(
                f"JOB_ENV: {key} carries a secret, and Ray shows a job's environment in its dashboard and job API; "
                f"put it in a KEY=VALUE file on the cluster's shared storage and pass the file's path instead: "
                f"JOB_ENV='{{\"{ENV_FILE}\": \"/shared/secrets.env\"}}' (README: Secrets in Ray jobs)")
    return env


def load_env_file(path: str | None = None) -> list[str]:
    """Set the variables of the file `path` (default $TSD_ENV_FILE) that the environment does not
    already have; returns their names (never the values). Nothing when no file is named."""
    path = path or os.environ.get(ENV_FILE)
    if not path:
        return []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise FileNotFoundError(f"{ENV_FILE}: cannot read {path} ({e.strerror or type(e).__name__}); it must exist "
                                f"at that path on every node that runs the job") from None
    loaded = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip().strip("'\"")
        if not sep or not key.isidentifier():
            raise ValueError(f"{ENV_FILE}: {path}:{number}: expected KEY=VALUE")
        if key not in os.environ:
            os.environ[key] = value
            loaded.append(key)
    return loaded


def main(argv: list[str]) -> int:
    try:
        check_job_env(argv[0] if argv else "{}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
