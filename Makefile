# Two commands do all set-up from a fresh clone on a machine with only Python:
#   make demo   -- runs the demo job
#   make test   -- runs the test suite
# Override the torch build for GPU machines, e.g.  make test TORCH_SPEC="torch==2.13.0 --index-url ..."
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
PYTEST_ARGS ?=
# The suite's workers: 2 on this 2-core machine (docs/TESTING.md: 3 were slower, the Ray tests most).
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast clean multinode-tools

setup: $(STAMP)

# torch first and pinned: an unpinned torch pulled in by a dependency is a multi-GB CUDA build.
# pip byte-compiles the 22k files of the environment on one core (~57 s here): it is told not to,
# and compileall does it on every core instead.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet --no-compile $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true  # a file no Python can compile: pip skips it too
	touch $@

demo: $(STAMP)
	bash launch/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The DeepSpeed-launcher test across two hosts (tests/test_multinode.py) needs sshd and pdsh; without
# them it skips with the reason. As root on Debian/Ubuntu this installs them (CI: .ci/run); elsewhere it
# says what is missing. Where systemd runs, the package may start the system's own sshd.
multinode-tools:
	@if [ -x /usr/sbin/sshd ] && command -v pdsh >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server pdsh >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server pdsh >/dev/null; } \
	  || echo "multinode-tools: could not install openssh-server and pdsh: the DeepSpeed launcher's two-host test will skip"; \
	else echo "multinode-tools: sshd or pdsh missing and not root with apt-get: the DeepSpeed launcher's two-host test will skip"; fi

clean:
	rm -rf $(VENV) .pytest_cache runs mlruns mlflow.db
