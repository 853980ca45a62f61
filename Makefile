# Two commands: `make demo` (train the Fashion-MNIST classifier) and `make test`.
# Each creates .venv on first use; editing pyproject.toml reinstalls.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
FMNIST  ?= /usr/share/datasets/fashion-mnist

.PHONY: demo test test-unit test-slow bench package-check fashion-mnist clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Tests run in parallel processes (pytest-xdist), a file's tests in one process (its module fixtures
# built once): 2:53 instead of 5:40 on 2 cores. XDIST= runs them in this process, one at a time.
# A worker killed by pytest-timeout (a hung test) ends the session: pytest-xdist's replacement
# worker can wait for ever under --dist loadfile (pytest-xdist issues 784 and 1378).
XDIST   ?= -n auto --maxprocesses 4 --dist loadfile --max-worker-restart 0

test: $(STAMP)
	$(PY) -m pytest $(XDIST)

test-unit: $(STAMP)
	$(PY) -m pytest $(XDIST) tests/unit

# the tests marked slow (several processes, the detector's network-only ONNX export, compiling,
# ResNet-50 recipes): a few minutes more; CI runs them after `make test`
test-slow: $(STAMP)
	$(PY) -m pytest $(XDIST) -m slow

demo: $(STAMP) fashion-mnist
	$(PY) -m tasks.classify

bench: $(STAMP)
	$(PY) -m benchmarks.bench classify

# Build the wheel, install it into a fresh venv, run `onetrunk classify` from another folder (CI runs it)
package-check:
	bash .ci/package_check.sh

# Fashion-MNIST comes from the Debian/Ubuntu package dataset-fashion-mnist.
fashion-mnist:
	@if [ -n "$$FASHION_MNIST_DIR" ] || [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "Installing Fashion-MNIST (apt package dataset-fashion-mnist)"; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
		sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST not found: install the package dataset-fashion-mnist, or set FASHION_MNIST_DIR"; \
		echo "to a folder with the four IDX .gz files, or run python -m tasks.classify --download"; exit 1; \
	fi

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
