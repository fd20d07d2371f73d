# The two Quick start commands (`make demo`, `make test`) set everything up themselves:
# a virtual environment in .venv with peftray and its test extra installed.
# TORCH_CONSTRAINTS pins the CPU build of torch on machines without a GPU; set it empty to let pip choose.
PYTHON ?= python3
VENV ?= .venv
TORCH_CONSTRAINTS ?= constraints-cpu.txt
PYTEST_ARGS ?=

# The one version (pyproject.toml) names the wheel and tags the image; the manifests carry it too (tests/packaging).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
WHEEL := dist/peftray-$(VERSION)-py3-none-any.whl
# make image VARIANT=cpu|gpu|tpu [IMAGE=my.registry/peftray] [TAG=...]; the gpu/tpu tags carry a suffix.
VARIANT ?= cpu
IMAGE ?= ghcr.io/peftray/peftray
TAG ?= $(VERSION)$(if $(filter-out cpu,$(VARIANT)),-$(VARIANT))

.PHONY: install demo test bench clean-stack wheel image push

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

# The wheel the launcher YAMLs copy to every node (cluster/*.yaml: file_mounts) and the image installs.
wheel: $(WHEEL)

$(WHEEL): pyproject.toml README.md $(shell find peftray -type f ! -name '*.pyc' ! -path '*/__pycache__/*')
	$(PYTHON) -m pip wheel --quiet --no-deps --wheel-dir dist .

# The image builds its own wheel from this checkout (infra/docker/Dockerfile), so it needs no `make wheel`.
image:
	docker build -f infra/docker/Dockerfile --build-arg VARIANT=$(VARIANT) --build-arg PEFTRAY_VERSION=$(VERSION) \
		-t $(IMAGE):$(TAG) .

push:
	docker push $(IMAGE):$(TAG)
