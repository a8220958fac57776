# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromedriver

.PHONY: demo test install fashion-mnist browser bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

$(FMNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

fashion-mnist: $(FMNIST)

# headless Chromium + its driver for the report page tests (Debian's packages; nothing downloads a browser)
$(CHROMIUM):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver

browser: $(CHROMIUM)

demo: install fashion-mnist
	$(VENV)/bin/imgcls demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: install browser
	$(PY) -m pytest -q -n auto --dist loadfile

bench: install
	$(PY) bench/train_throughput.py
	$(PY) bench/time_to_accuracy.py

clean:
	rm -rf $(VENV) runs .pytest_cache
