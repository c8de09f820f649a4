# The two commands of the README: `make demo` and `make test`. Each installs what it needs.
VPY := .venv/bin/python
PYTEST_FLAGS ?= -q

.PHONY: setup demo test test-slow bench lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(VPY) -m tritlm demo --out runs/demo

test: setup
	@$(VPY) -m pytest $(PYTEST_FLAGS)

test-slow: setup
	@$(VPY) -m pytest -m slow $(PYTEST_FLAGS)

lint: setup
	@.venv/bin/ruff check src tests benchmarks

clean:
	rm -rf runs build *.egg-info
