# Two commands do all set-up on a fresh machine:
#   make demo   the main job: the report's pipeline on the built-in synthetic benchmark
#   make test   the test suite (make test-fast: without the tests marked slow, under 2 minutes)
# Both create the virtual environment $(VENV) and install what they need into it.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first; override for another platform, e.g.
#   make demo TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_ARGS ?=
PY := $(VENV)/bin/python

.PHONY: venv demo test test-fast clean-results

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

demo: venv
	$(PY) experiments.py $(DEMO_ARGS)

# The suite on every core (pytest-xdist, at most 4 workers: each is a torch process), whole files
# per worker so that a module's fixtures are built once; TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= auto
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile tests

test-fast: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile -m "not slow" tests

clean-results:  # the demo's scratch output; the committed results/ stay
	rm -rf runs/synthetic
