# fastconv: the two commands of the README, and the steps they are built from.
#   make demo   create the venv, install, build, and run the main job
#   make test   create the venv, install, build, and run the test suite

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.fastconv-installed

.PHONY: demo test install build benchmark gpu-check clean

# The venv is rebuilt only when the requirements or the build script change; the extension is
# rebuilt incrementally (ninja) by `make build`.
$(INSTALLED): requirements.txt setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# Editable install of the Python package only; `build` compiles the extension once, in
	# place and incrementally (pip would compile it in a throwaway directory every time).
	FASTCONV_BUILD_CUDA=0 $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

install: $(INSTALLED)

build: install
	$(PY) setup.py build_ext --inplace

test: build
	$(PY) -m pytest

demo: build
	$(PY) -m fastconv.demo

benchmark: build
	$(PY) -m benchmarks.run

gpu-check:
	bash benchmarks/gpu_check.sh out/gpu_check

clean:
	rm -rf build $(VENV) fastconv/_C*.so *.egg-info
