# make train      the embedded default: sCT on digits (CPU, a few minutes), sample grids and FD in runs/digits-sct
# make reproduce  the paper's claims on digits: teacher, sCD, sCT (+ablations), FD tables and plots -> docs/results.md (<= 60 min)
# make distill-demo  a diffusers SD3 transformer trained on digits, then distilled with sCD (--arch diffusers; <= 15 min)
# make test       fresh clone -> .venv, pinned deps, build scm_fast._C, run the tests (CPU, < 10 min)
# make test-slow  the larger cases too
# make bench      CPU benchmarks (fused attention JVP, block-sparse attention and adaptive norm vs PyTorch) and the GPU kernel build report
# make asan       the C++ kernel tests under AddressSanitizer (rebuilds the extension twice)
# make gpu-check  on a CUDA machine: CUDA tests, kernel report, benchmarks
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.scm_fast-installed

.PHONY: install train distill-demo reproduce test test-slow bench report asan gpu-check clean

$(STAMP): requirements.txt pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q -e . --no-build-isolation
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(PY) -m scm_fast.train $(ARGS)

distill-demo: $(STAMP)
	$(PY) examples/distill_demo.py $(ARGS)

reproduce: $(STAMP)
	$(PY) -m pip install -q matplotlib
	$(PY) experiments/reproduce.py $(ARGS)

test: $(STAMP)
	$(PY) -m scm_fast.info
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(PY) -m pip install -q matplotlib
	$(PY) benchmarks/kernel_report.py
	$(PY) benchmarks/adaptive_norm.py
	$(PY) benchmarks/block_sparse_attention.py
	$(PY) benchmarks/jvp_attention.py

report: $(STAMP)
	$(PY) benchmarks/kernel_report.py
	$(PY) benchmarks/kernel_report.py --blocks aligned

asan: $(STAMP)
	SCM_FAST_ASAN=1 $(PY) -m pip install -q -e . --no-build-isolation
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0 \
		$(PY) -m pytest -q -p no:cacheprovider tests/ops -k "cpp or opcheck"; \
		status=$$?; $(PY) -m pip install -q -e . --no-build-isolation; exit $$status

gpu-check: $(STAMP)
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check needs a CUDA device')"
	$(PY) -m pip install -q matplotlib
	$(PY) -m scm_fast.info
	$(PY) -m pytest -q -m "slow or not slow" tests
	$(PY) benchmarks/kernel_report.py
	$(PY) benchmarks/kernel_report.py --blocks aligned
	$(PY) benchmarks/adaptive_norm.py --device cuda
	$(PY) benchmarks/block_sparse_attention.py --device cuda --L 16384 --H 16
	$(PY) benchmarks/jvp_attention.py --device cuda

clean:
	rm -rf build *.egg-info scm_fast/_C*.so benchmarks/out
