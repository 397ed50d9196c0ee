"""The failures every command ends in one line and exit 2, whatever the command: a broken file
and a tracking server that does not answer.

User errors are ValueErrors whose message names what is wrong and where (ConfigError, DataError,
AdapterError, MergeError, ...): `tsd` (pipeline.launch.cli) and the worker entry
(pipeline.launch.worker) print them as one `error: ...` line and exit 2. Two kinds come from
outside the user's settings and are the same in every command, so they are named here:

- `CorruptFileError`: a file is there but is not what it claims to be (a truncated download, a
  garbage safetensors header, a half-written JSON file). pipeline.file_checks finds these from
  headers and sizes, before a library fails on them with a message that names no file
  (safetensors' "incomplete metadata", a bare JSONDecodeError) or, in `tsd train`, in a worker
  after Ray has started.
- `ServerUnreachableError`: an http(s) MLflow tracking server that accepts no connection
  (pipeline.tracking.store.check_reachable), checked before a command starts its work; MLflow
  itself would retry for minutes and then raise with the URI, password included, in its message.

`known_failure` recognises the libraries' own exceptions of these two kinds by type, for a path no
early check covers: a connection error under MLflow's exception (a server that goes away in the
middle of a command), safetensors' own error, a zip/tar/compressed file cut short (a cached
download in tsd prepare-*). `user_message` is the one line both entries print for an exception;
`masked_traceback` is the last resort for anything else (a bug, exit 1): the traceback, with every
secret masked.
"""

from __future__ import annotations

import gzip
import lzma
import sys
import tarfile
import traceback
import zipfile
import zlib

from pipeline.tracking.secrets import mask_secrets


class DataError(ValueError):
    """A data file is unusable; the message names the file and, for a bad row, the row and field.
    (Here, not in pipeline.data.tasks, so that every data module can raise it without importing
    the others; pipeline.data.tasks re-exports it.)"""


class CorruptFileError(ValueError):
    """A file exists but is truncated or garbage; the message names the file and what is wrong."""


class ServerUnreachableError(ValueError):
    """A tracking server accepts no connection; the message names the setting and the (masked) URI."""


def _chain(exc: BaseException):
    """`exc` and the exceptions it was raised from or while handling (MLflow raises its own
    exception inside `except` without `from`: the connection error is its __context__)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)  # as tracebacks show it


def _connection_error_types() -> tuple[type, ...]:
    """What a refused, reset or timed-out connection raises, in the libraries already imported
    (looked up in sys.modules: naming an exception must not import requests or urllib3)."""
    types: list[type] = [ConnectionError, TimeoutError]
    requests = sys.modules.get("requests.exceptions")
    if requests is not None:
        types += [requests.ConnectionError, requests.Timeout]
    urllib3 = sys.modules.get("urllib3.exceptions")
    if urllib3 is not None:
        types += [urllib3.MaxRetryError, urllib3.NewConnectionError, urllib3.ProtocolError]
    return tuple(types)


# A zip, tar or compressed stream cut short or not one at all (EOFError: a compressed stream that
# ends early; nothing in a command reads from a terminal).
_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, zlib.error, lzma.LZMAError, EOFError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def known_failure(exc: BaseException) -> str | None:
    """The one-line message (secrets masked) for a library's exception that means a broken file or
    an unreachable server; None for anything else."""
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, (CorruptFileError, ServerUnreachableError)):
            return mask_secrets(_first_line(e))
    connection = _connection_error_types()
    if any(isinstance(e, connection) for e in chain):
        return mask_secrets(f"a server did not answer ({_first_line(exc)}); is it running, and is its address right?")
    if any(isinstance(e, _ARCHIVE_ERRORS) for e in chain):  # names no file either
        return mask_secrets(f"a file is truncated or not the archive its name says ({_first_line(exc)}); if it is a "
                            "cached download (tsd prepare-model / prepare-data: <cache>/downloads), delete it and "
                            "rerun to fetch it again")
    safetensors_error = getattr(sys.modules.get("safetensors"), "SafetensorError", None)
    if safetensors_error is not None and any(isinstance(e, safetensors_error) for e in chain):  # names no file
        return (f"a safetensors file is truncated or not safetensors ({_first_line(exc)}); a broken download "
                "or copy? Fetch it again")
    return None


def user_message(exc: BaseException) -> str | None:
    """What a command prints after `error: ` for `exc` (secrets masked), or None for a bug: a user
    error (a ValueError or FileNotFoundError, which name what is wrong) or a `known_failure`."""
    if isinstance(exc, (ValueError, FileNotFoundError)):
        return mask_secrets(str(exc))
    return known_failure(exc)


def masked_traceback(exc: BaseException) -> str:
    """The traceback of `exc` as Python prints it, with URI passwords and tokens masked."""
    return mask_secrets("".join(traceback.format_exception(exc)))
