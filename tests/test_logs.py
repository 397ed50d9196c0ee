"""pipeline.logs: one format, rank 0 only unless asked, nothing printed twice, dependency
deprecation notices filtered (and only theirs)."""

import logging
import warnings

import pytest

from pipeline import logs


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(logs, "_state", {"role": "", "configured": False})
    monkeypatch.setattr(logs.LOGGER, "handlers", [])
    monkeypatch.delenv("TSD_LOG_ALL_RANKS", raising=False)
    with warnings.catch_warnings():
        yield


def test_a_line_names_the_process_and_goes_to_stderr_once(fresh, capsys):
    seen = []

    class Root(logging.Handler):  # like Ray Train's console handler on the root logger
        def emit(self, record):
            seen.append(record.getMessage())

    root = Root()
    logging.getLogger().addHandler(root)
    try:
        logs.setup_logging(role="driver")
        logs.log("MLflow run abc")
    finally:
        logging.getLogger().removeHandler(root)
    assert capsys.readouterr().err == "[tsd driver] MLflow run abc\n"
    assert seen == []


def test_only_rank_zero_speaks_unless_a_line_or_the_user_asks(fresh, capsys, monkeypatch):
    monkeypatch.setattr(logs, "_rank", lambda: 1)
    logs.log("step 3/10")
    logs.log("error: out of memory", all_ranks=True)
    assert capsys.readouterr().err == "[tsd rank 1] error: out of memory\n"
    monkeypatch.setenv("TSD_LOG_ALL_RANKS", "1")
    logs.log("step 4/10")
    assert capsys.readouterr().err == "[tsd rank 1] step 4/10\n"
    monkeypatch.setattr(logs, "_rank", lambda: 0)
    monkeypatch.delenv("TSD_LOG_ALL_RANKS")
    logs.log("step 5/10")
    assert capsys.readouterr().err == "[tsd rank 0] step 5/10\n"


def test_dependency_deprecations_are_filtered_and_the_projects_own_warnings_are_not(fresh):
    logs.setup_logging()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # what a fresh process has, before setup_logging's filters
        logs._state["configured"] = False
        logs.setup_logging()
        for module in ("torch.distributed.c10d_logger", "transformers.modeling_utils", "deepspeed.runtime.engine"):
            warnings.warn_explicit("`all_gather_into_tensor` is deprecated", FutureWarning, "x.py", 1, module=module)
        warnings.warn_explicit("old", DeprecationWarning, "y.py", 2, module="peft.tuners")
        warnings.warn_explicit("torchvision is not a dependency we filter", FutureWarning, "z.py", 3, module="torchvision")
        warnings.warn_explicit("ours", FutureWarning, "w.py", 4, module="pipeline.training.loop")
    assert sorted(str(w.message) for w in caught) == ["ours", "torchvision is not a dependency we filter"]
