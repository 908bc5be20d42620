# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create the virtual environment in .venv first if it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/demo

.PHONY: demo test bench-cpu clean

# animal-mnist's metadata wrongly requires tensorflow, so the data installs with --no-deps.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[train,dev]'
	$(PY) -m pip install --quiet --no-deps animal-mnist==0.4
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/snclr demo --output-dir $(RUN)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench-cpu: $(VENV)/.installed
	$(PY) -m bench.bench_knn_topk --small
	$(PY) -m bench.bench_soft_target_ce --small

clean:
	rm -rf $(VENV) runs .pytest_cache
