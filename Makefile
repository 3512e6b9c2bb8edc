# Two commands: `make demo` runs the whole path on the embedded synthetic data, `make test` runs the test suite.
# Each creates .venv and installs the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test install proto clean cifar10

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m scripts.demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

proto: $(STAMP)
	$(BIN)/python -m scripts.gen_proto

# CIFAR-10 train split (JPEG) from the shared folder beside this repository, unpacked into data/ (git-ignored).
cifar10: data/cifar10/train

data/cifar10/train:
	mkdir -p data
	tar xzf ../shared/data/cifar10-train-jpeg.tar.gz -C data

clean:
	rm -rf runs .pytest_cache
