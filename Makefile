# Sluice: the two commands of the quickstart, and the rest of the project's checks.
#   make run       a standalone data plane on deploy/examples/quickstart.yaml (port 8080)
#   make test      everything the project checks (services are started first)
#   make services  Postgres, Redis and a Kafka-protocol broker on loopback, for the tests
#   make lint      formatting and clippy only
#   make bench     the benchmarks (release build; results in target/bench/)

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo

.PHONY: run test services lint fmt build bench

run:
	bash scripts/run.sh

test: services lint build
	@# The service URLs come from scripts/services.sh (the export lines it prints); the
	@# assignment, unlike a bare eval "$$(...)", fails the recipe when the script fails.
	service_env=$$(bash scripts/services.sh); eval "$$service_env"; \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) test --workspace --doc --locked; \
	  $(CARGO) nextest run --workspace --all-targets --locked --no-fail-fast; \
	else \
	  $(CARGO) test --workspace --locked --no-fail-fast; \
	fi

services:
	bash scripts/services.sh

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

build:
	@# The end-to-end tests start the real binaries; build them before the tests run.
	$(CARGO) build --workspace --bins --locked

fmt:
	$(CARGO) fmt --all

bench: services
	@# Benchmarks compare side by side in one run and write target/bench/NAME.json.
	service_env=$$(bash scripts/services.sh); eval "$$service_env"; \
	tools_env=$$(bash scripts/bench-tools.sh); eval "$$tools_env"; \
	$(CARGO) run --release --locked -p sluice-bench --bin registry; \
	$(CARGO) run --release --locked -p sluice-bench --bin proxy; \
	$(CARGO) run --release --locked -p sluice-bench --bin access; \
	$(CARGO) run --release --locked -p sluice-bench --bin publish; \
	$(CARGO) run --release --locked -p sluice-bench --bin fanout; \
	$(CARGO) bench --locked -p sluice-bench --bench access_decision; \
	$(CARGO) run --release --locked -p sluice-bench --bin propagation; \
	$(CARGO) run --release --locked -p sluice-bench --bin scale
