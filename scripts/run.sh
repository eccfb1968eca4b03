#!/usr/bin/env bash
# `make run`: a standalone data plane on deploy/examples/quickstart.yaml, in front of a demo
# backend (Python's static file server on deploy/examples/site). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

listen=${SLUICE_RUN_LISTEN:-127.0.0.1:8080}
admin=${SLUICE_RUN_ADMIN:-127.0.0.1:9901}

cargo build --locked --release -p sluice-data-plane --bin sluice-dp

python3 -m http.server 8081 --bind 127.0.0.1 --directory deploy/examples/site >/dev/null 2>&1 &
backend=$!
trap 'kill $backend 2>/dev/null || true' EXIT

cat <<TEXT
Sluice data plane on http://$listen (admin on http://$admin). Try:
  curl -i http://$listen/ping
  curl -i http://$listen/api/hello.json
  curl -i http://$listen/greet/ada
  curl -i http://$listen/nowhere
  curl -s http://$admin/config
  curl -s http://$admin/metrics | grep sluice_requests
TEXT
target/release/sluice-dp --config deploy/examples/quickstart.yaml --listen "$listen" --admin-listen "$admin"
