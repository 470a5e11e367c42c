# Two commands on a fresh machine: `make demo` and `make test` (`make test-all`: every test).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export FLWR_TELEMETRY_ENABLED := 0
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-all install bench clean deploy-demo docs

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# --overwrite: a second `make demo` replaces runs/quickstart/ (a plain run refuses a used folder)
demo: $(VENV)/.installed
	$(PY) -m fedsim experiments/scenarios/quickstart.yaml --overwrite

# A TLS SuperLink with SuperNode authentication and three SuperNodes on 127.0.0.1 (README "Deploy on real clients").
deploy-demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m fedsim.deploy.demo

# The fast set: tests that start Ray, other processes or a reconstruction attack are left out, but for
# one end-to-end test per feature (the rule: tests/conftest.py); at most 3 minutes on 2 cores.
# test-all (and CI, .ci/run): every test.
test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

# The documentation site's tools (pyproject's docs extra), beside what `make test` installs.
$(VENV)/.installed-docs: $(VENV)/.installed pyproject.toml constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e '.[docs]'
	touch $@

# The optional trackers (pyproject's mlflow and tensorboard extras): their tests skip without them.
$(VENV)/.installed-trackers: $(VENV)/.installed pyproject.toml constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e '.[mlflow,tensorboard]'
	touch $@

test-all: $(VENV)/.installed $(VENV)/.installed-docs $(VENV)/.installed-trackers
	$(PY) -m pytest -q

# The documentation site on http://127.0.0.1:8000 (rebuilt on every change); mkdocs.yml, docs/.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

bench: $(VENV)/.installed
	$(PY) benchmarks/engine_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
