# The two Quick start commands (`make demo`, `make test`) set everything up themselves:
# a virtual environment in .venv with peftray and its test extra installed.
# TORCH_CONSTRAINTS pins the CPU build of torch on machines without a GPU; set it empty to let pip choose.
PYTHON ?= python3
VENV ?= .venv
TORCH_CONSTRAINTS ?= constraints-cpu.txt
PYTEST_ARGS ?=

.PHONY: install demo test bench clean-stack

$(VENV)/.installed: pyproject.toml $(TORCH_CONSTRAINTS)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(if $(TORCH_CONSTRAINTS),-c $(TORCH_CONSTRAINTS)) -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/peftray demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(VENV)/bin/peftray bench tuners

clean-stack:
	test ! -x $(VENV)/bin/peftray || $(VENV)/bin/peftray stack down
