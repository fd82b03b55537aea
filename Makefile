# Two commands: `make serve` and `make test`. Everything they need is installed from here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test lint typecheck schema check-schema pytest bench clean system-deps

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/interpql serve --host $(HOST) --port $(PORT) $(ARGS)

test: $(STAMP) system-deps lint typecheck check-schema pytest

# Services the tests start for real (Debian packages); installed only where missing.
SYSTEM_PACKAGES := redis-server
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check interpql tests bench
	$(BIN)/ruff format --check interpql tests bench

typecheck: $(STAMP)
	$(BIN)/mypy interpql

schema: $(STAMP)
	$(BIN)/interpql export-schema --output schema.graphql

check-schema: $(STAMP)
	@$(BIN)/interpql export-schema | diff -u schema.graphql - \
		|| (echo "schema.graphql is stale: run 'make schema'" && exit 1)

pytest: $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache test-artifacts
