# moesim: two commands do everything on a fresh machine.
#   make demo   set up, then simulate static EP on the bundled trace and compare policies
#   make test   set up, then run the test suite
PYTHON ?= python3
STAMP := .venv-stamp

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml setup.py policies/_greedy_c.c traces/_synth_c.c
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

DEMO_POLICIES := static_ep swiftmoe eplb laer_fsep
DEMO_RUNS := $(addprefix runs/demo/,$(DEMO_POLICIES))

# The main job on built-in defaults: the bundled trace (24 layers, 16 ranks, 32 experts, top-2)
# on 2 nodes x 8 A100 (LAER's testbed links), four policies, all dropless; SwiftMoE and LAER get
# 4 expert slots per GPU (SwiftMoE's S=4) so that 16 GPUs x 4 slots leave room for replicas of
# 32 experts. Then every figure and one HTML report under runs/demo/.
demo: $(STAMP)
	rm -rf runs/demo
	$(PYTHON) -m moesim trace info
	$(PYTHON) -m moesim simulate --policy static_ep --knob capacity_factor=none --timeline 10 --out runs/demo/static_ep
	$(PYTHON) -m moesim simulate --policy swiftmoe --knob capacity_factor=none --knob slots_per_rank=4 --timeline 10 --out runs/demo/swiftmoe
	$(PYTHON) -m moesim simulate --policy eplb --knob capacity_factor=none --timeline 10 --out runs/demo/eplb
	$(PYTHON) -m moesim simulate --policy laer_fsep --knob capacity_factor=none --knob slots_per_rank=4 --timeline 10 --out runs/demo/laer_fsep
	$(PYTHON) -m moesim plot all $(DEMO_RUNS) -o runs/demo/figures
	$(PYTHON) -m moesim report $(DEMO_RUNS) -o runs/demo/report.html
	@echo; echo "demo done: runs/demo/figures/*.png, runs/demo/report.html"

# The test suite also covers `moesim search --ray` against a local Ray head, oracle_ilp on HiGHS
# and shell completion: the ray (~80 MB wheel, ~20 s to install), highs and completion extras
# go in for `make test` only.
RAY_STAMP := .venv-ray-stamp
$(RAY_STAMP): $(STAMP)
	$(PYTHON) -m pip install -q -e '.[dev,ray,highs,completion]'
	@touch $(RAY_STAMP)

test: $(STAMP) $(RAY_STAMP)
	$(PYTHON) -m pytest -q

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/sim_speed.py
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/sim_speed.py --layout --micro-batches 16
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/planner_speed.py
	$(PYTHON) benchmarks/trace_speed.py --iterations 10 --ranks 256
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/regroup_speed.py
	$(PYTHON) benchmarks/policies.py --quick
	$(PYTHON) benchmarks/memory_layouts.py
	$(PYTHON) benchmarks/paper_layouts.py
	$(PYTHON) benchmarks/collective_context.py
	$(PYTHON) benchmarks/accuracy.py --out runs/accuracy

lint: $(STAMP)
	$(PYTHON) -m ruff check .

clean:
	rm -rf runs build *.egg-info $(STAMP) $(RAY_STAMP)
