# Two commands: `make serve` and `make test`. Everything they need is installed from here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
HOST ?= 127.0.0.1
PORT ?= 8000
# npm folders, each installed by `npm ci` again only when its package-lock.json changes.
GRAPHIQL_ASSETS := interpql/static/node_modules/.interpql-installed
NPM_STAMPS := $(GRAPHIQL_ASSETS) tests/federation/node_modules/.interpql-installed \
	clients/typescript/node_modules/.interpql-installed explorer/node_modules/.interpql-installed
# The files the GraphiQL and graph pages load, copied from GRAPHIQL_ASSETS's npm folder with their
# licenses into what the package carries (web.py's vendor_assets).
VENDORED := interpql/static/vendor/LICENSES.txt
# The explorer (/explore): built from explorer/ (TypeScript, typed from schema.graphql) by Vite.
EXPLORER_BUILT := interpql/static/explore/explore.js
EXPLORER_SOURCES := $(wildcard explorer/src/*.ts) explorer/vite.config.ts explorer/codegen.ts \
	explorer/tsconfig.json schema.graphql

.PHONY: setup serve test lint typecheck imports schema check-schema pytest bench clean dist \
	system-deps npm-deps node-tools graphiql-assets explorer-assets clients

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

serve: $(STAMP) graphiql-assets explorer-assets
	$(BIN)/interpql serve --host $(HOST) --port $(PORT) $(ARGS)

# GraphiQL served from local npm packages where npm is at hand; otherwise the server falls back
# to GraphiQL's CDN page, and `make serve` still needs nothing but python.
graphiql-assets:
	@if command -v npm >/dev/null; then \
		$(MAKE) --no-print-directory $(VENDORED) \
			|| echo "GraphiQL assets not installed: /graphql serves the CDN page"; \
	else echo "npm not found: /graphql serves GraphiQL's CDN page"; fi

# The explorer where npm is at hand (without it, /explore says how to build it).
explorer-assets:
	@if command -v npm >/dev/null; then \
		$(MAKE) --no-print-directory $(EXPLORER_BUILT) \
			|| echo "explorer not built: /explore says how to build it"; \
	else echo "npm not found: the explorer is not built"; fi

$(EXPLORER_BUILT): explorer/node_modules/.interpql-installed $(EXPLORER_SOURCES)
	cd explorer && npm run build --silent

$(VENDORED): $(GRAPHIQL_ASSETS) $(STAMP) interpql/web.py
	$(BIN)/python -c "from interpql.web import vendor_assets; vendor_assets()"

test: $(STAMP) system-deps npm-deps $(VENDORED) $(EXPLORER_BUILT) lint typecheck imports \
	check-schema pytest

# An sdist and a wheel in dist/ (PyPA build), carrying the demo and the browser assets built
# above: npm is needed here, never where the wheel is installed.
dist: $(STAMP) $(VENDORED) $(EXPLORER_BUILT)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	@ls -l dist

# Services the tests start for real (Debian packages); installed only where missing.
# chromium: the browser tests drive Debian's build (/usr/bin/chromium) through Playwright.
SYSTEM_PACKAGES := redis-server chromium
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# The npm packages of the GraphiQL page, the federation gateway and the TypeScript client.
npm-deps: $(NPM_STAMPS)

node-tools:
	@command -v npm >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs npm; }

%/node_modules/.interpql-installed: %/package-lock.json %/package.json | node-tools
	cd $* && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The TypeScript client's types, generated from schema.graphql, and its example type-checked.
clients: clients/typescript/node_modules/.interpql-installed
	cd clients/typescript && npx graphql-codegen --config codegen.ts && npx tsc --noEmit

lint: $(STAMP)
	$(BIN)/ruff check interpql tests bench examples
	$(BIN)/ruff format --check interpql tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy interpql

# The layering contracts of pyproject.toml ([tool.importlinter]).
imports: $(STAMP)
	$(BIN)/lint-imports --no-cache

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
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache test-artifacts \
		$(dir $(NPM_STAMPS)) clients/typescript/src/gql explorer/src/gql interpql/static/explore \
		interpql/static/vendor dist build
