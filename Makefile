# fastconv: the two commands of the README, and the steps they are built from.
#   make demo   create the venv, install, build, and run the main job
#   make test   create the venv, install, build, and run the test suite

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.fastconv-installed
# -qq: errors only. One -q still prints a WARNING per unreadable index a machine's pip
# config names (e.g. file:///opt/pypi-more here), about 47 lines for nothing.
PIP := $(PY) -m pip -qq
# pytest-xdist workers: one per core (2 on CI). Not in pyproject.toml's addopts, because the
# GPU machine's pytest (benchmarks/gpu_check.sh) may lack pytest-xdist and shares one GPU.
TEST_WORKERS ?= auto

.PHONY: demo test install build benchmark gpu-check clean

# The venv is rebuilt only when the requirements or the build script change; the extension is
# rebuilt incrementally (ninja) by `make build`. The editable install is of the Python package
# only: `build` compiles the extension once, in place and incrementally (pip would compile it
# in a throwaway directory every time). (Comments inside a recipe would be echoed by make.)
$(INSTALLED): requirements.txt setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements.txt
	FASTCONV_BUILD_CUDA=0 $(PIP) install --no-build-isolation --no-deps -e .
	touch $@

install: $(INSTALLED)

# With FASTCONV_BUILD_CUDA unset, only where a GPU is visible (setup.py says why not in one
# line); -q keeps setuptools to that line and one line per compiled unit.
build: install
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest -n $(TEST_WORKERS)

demo: build
	$(PY) -m fastconv demo

benchmark: build
	$(PY) -m benchmarks.run

gpu-check:
	bash benchmarks/gpu_check.sh out/gpu_check

clean:
	rm -rf build $(VENV) fastconv/_C*.so *.egg-info
