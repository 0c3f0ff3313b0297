PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench reliability clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,turbo,weights,export,tensorboard,app]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/verydeep demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# the reliability suite at full length (a short version of each runs in `make test`); -s shows its figures
reliability: $(STAMP)
	VERYDEEP_RELIABILITY=full $(PY) -m pytest -q -s -p no:cacheprovider tests/reliability/test_runs.py \
		tests/reliability/test_images.py tests/reliability/test_cli.py tests/reliability/test_hostile.py

bench: $(STAMP)
	$(PY) benchmarks/model_speed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
