# moesim: two commands do everything on a fresh machine.
#   make demo   set up, then simulate static EP on the bundled trace and compare policies
#   make test   set up, then run the test suite
PYTHON ?= python3
STAMP := .venv-stamp

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m moesim trace info
	$(PYTHON) -m moesim simulate --out runs/demo-static_ep

test: $(STAMP)
	$(PYTHON) -m pytest -q

bench: $(STAMP)
	$(PYTHON) benchmarks/sim_speed.py

lint: $(STAMP)
	$(PYTHON) -m ruff check .

clean:
	rm -rf runs build *.egg-info $(STAMP)
