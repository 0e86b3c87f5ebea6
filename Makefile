# Both targets build their own virtual environment in .venv from nothing but python3.11 + pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 is pinned first: it is the CPU build (an unpinned torch may pull a CUDA build).
TORCH := torch==2.13.0

.PHONY: demo test docs install-demo install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.demo: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[demo]"
	touch $@

$(VENV)/.test: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[all,dev,docs]"
	# timm's optimizers are tested, but timm requires torchvision, whose PyPI build needs a CUDA
	# torch (pip would replace the CPU build above): timm without its dependencies, then the
	# small ones (timm.optim's optimizers import only torch; the tests load them without
	# timm's package __init__, which imports torchvision, where torchvision cannot load).
	$(BIN)/pip install --quiet --no-deps "timm>=1.0.31"
	$(BIN)/pip install --quiet "huggingface_hub>=0.23" "safetensors>=0.4" "pyyaml>=6"
	# DeepSpeed (the ZeRO 1-3 tests) is a source package built against the torch above
	# (--no-build-isolation); --no-deps keeps pip from replacing that torch, and the modules
	# it imports are in the dev extra.
	$(BIN)/pip install --quiet --no-build-isolation --no-deps "deepspeed==0.19.8"
	touch $@ $(VENV)/.demo $(VENV)/.docs

$(VENV)/.docs: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[docs]"
	touch $@

install-demo: $(VENV)/.demo
install-test: $(VENV)/.test

## demo: train a small real model, watched; TensorBoard logs and a PNG in runs/demo
demo: $(VENV)/.demo
	$(BIN)/lrscope demo --out runs/demo

## test: every test (the README's and the docs' examples included), Keras ones on each of its
## three backends, then the docs site built strictly (a broken link or reference fails)
test: $(VENV)/.test
	$(BIN)/python -m pytest
	KERAS_BACKEND=jax $(BIN)/python -m pytest -o addopts="" tests/test_keras.py tests/test_keras_newer.py
	KERAS_BACKEND=torch $(BIN)/python -m pytest -o addopts="" tests/test_keras.py tests/test_keras_newer.py
	$(BIN)/mkdocs build --strict -d site

## docs: the documentation site (mkdocs-material + mkdocstrings), built strictly into site/
docs: $(VENV)/.docs
	$(BIN)/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) runs site
