#!/usr/bin/env bash
# Install what the proxy benchmark (`make bench`, bench/src/bin/proxy.rs) needs, if missing:
#
#   nginx  the peer proxy and the shared backend      Debian package `nginx`, via apt-get
#   oha    the load generator, for both the max-rate   `cargo install oha` (pinned version)
#          and the fixed-rate (-q) runs                 into ${SLUICE_CACHE_DIR}/oha
#
# One load generator for every run, so the throughput and the fixed-rate measurements use the
# same client code and settings. (wrk has no fixed-rate mode and wrk2 is not packaged.)
#
# Safe to run repeatedly: with both tools present it only checks their versions (well under a
# second). Installing nginx does not start the system nginx service; the benchmark runs its
# own nginx processes on free loopback ports.
#
# stdout: `export ...` lines (eval or source them); the same lines are written to
#         ${SLUICE_CACHE_DIR}/bench-tools.env
# stderr: progress, prefixed "bench-tools:"
#
#   eval "$(bash scripts/bench-tools.sh)"
#
# Environment:
#   SLUICE_CACHE_DIR    cache/log dir (default: $HOME/.cache/sluice)
#   SLUICE_BENCH_NGINX  an nginx binary to use instead (only checked)
#   SLUICE_BENCH_OHA    an oha binary to use instead (only checked)
set -euo pipefail

CACHE_DIR=${SLUICE_CACHE_DIR:-${HOME:?HOME is not set; set SLUICE_CACHE_DIR}/.cache/sluice}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

OHA_VERSION=1.16.0
OHA_ROOT=$CACHE_DIR/oha
OHA_BIN=$OHA_ROOT/bin/oha
OHA_BUILD_LOG=$CACHE_DIR/oha-build.log
OHA_LOCK=$CACHE_DIR/oha.lock
OHA_BUILD_WAIT=1800 # seconds to wait for another run's oha build
# Default features: oha 1.16 does not build without a TLS backend, and the default (rustls
# with aws-lc) needs only the C compiler the workspace already needs.
OHA_INSTALL_CMD=(cargo install oha --version "$OHA_VERSION" --locked --root "$OHA_ROOT")
APT_LOG=$CACHE_DIR/apt.log
ENV_FILE=$CACHE_DIR/bench-tools.env

SCRIPT_NAME=bench-tools
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mkdir -p "$CACHE_DIR"

# ------------------------------------------------------------------- nginx ---

find_nginx() {
    if [[ -n ${SLUICE_BENCH_NGINX:-} ]]; then
        printf '%s\n' "$SLUICE_BENCH_NGINX"
    elif have nginx; then
        command -v nginx
    elif [[ -x /usr/sbin/nginx ]]; then
        printf '%s\n' /usr/sbin/nginx
    else
        return 1
    fi
}

install_nginx() {
    if ((EUID != 0)); then
        fail "nginx is missing and installing it needs root, but this script runs as $(id -un)" \
            "re-run as root (e.g. sudo bash scripts/bench-tools.sh), or apt-get install nginx"
    fi
    have apt-get || fail "nginx is missing and apt-get is not available" \
        "install nginx yourself and set SLUICE_BENCH_NGINX=/path/to/nginx"
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q)
    log "nginx: installing the Debian package (log: $APT_LOG)"
    if ! run_clean "${apt[@]}" update </dev/null >>"$APT_LOG" 2>&1; then
        show_tail "$APT_LOG"
        fail "apt-get update failed" "see $APT_LOG"
    fi
    # The package would start the system nginx on port 80; the benchmark does not want it.
    # A policy-rc.d that says "no" (101) stops invoke-rc.d from starting it; ours is removed
    # afterwards, and an existing one is left as it is.
    local policy=/usr/sbin/policy-rc.d ours=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        ours=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    local ok=1
    run_clean "${apt[@]}" install -y --no-install-recommends nginx </dev/null >>"$APT_LOG" 2>&1 || ok=0
    if ((ours)); then
        rm -f "$policy"
        trap - EXIT
    fi
    if ((!ok)); then
        show_tail "$APT_LOG"
        fail "apt-get install -y nginx failed" "see $APT_LOG"
    fi
}

NGINX=$(find_nginx) || {
    install_nginx
    NGINX=$(find_nginx) || fail "nginx was installed but no nginx binary is on PATH or in /usr/sbin"
}
[[ -x $NGINX ]] || fail "nginx at '$NGINX' is not executable" "fix SLUICE_BENCH_NGINX or unset it"
NGINX_VERSION=$("$NGINX" -v 2>&1 | sed -n 's|^nginx version: ||p')
[[ -n $NGINX_VERSION ]] || fail "'$NGINX -v' did not print a version"

# --------------------------------------------------------------------- oha ---

oha_version_of() { "$1" --version 2>/dev/null | awk '{print $2; exit}'; }

build_oha() {
    have cargo || fail "oha is not installed ($OHA_BIN missing) and cargo is not available to build it" \
        "install Rust (https://rustup.rs) and re-run, or set SLUICE_BENCH_OHA=/path/to/oha"
    exec 9>"$OHA_LOCK"
    if ! flock -n 9; then
        log "oha: another run is building it; waiting (lock: $OHA_LOCK, log: $OHA_BUILD_LOG)"
        flock -w "$OHA_BUILD_WAIT" 9 || fail "timed out after ${OHA_BUILD_WAIT}s waiting for $OHA_LOCK"
    fi
    if [[ -x $OHA_BIN && $(oha_version_of "$OHA_BIN") == "$OHA_VERSION" ]]; then
        exec 9>&-
        return 0 # the other run built it
    fi
    log "oha: building $OHA_VERSION with: ${OHA_INSTALL_CMD[*]}"
    log "oha: this takes a few minutes; progress goes to $OHA_BUILD_LOG"
    local started=$SECONDS
    # From the repository root, so its rust-toolchain.toml (a toolchain known to be there)
    # is used.
    if ! (cd "$REPO_ROOT" && run_clean "${OHA_INSTALL_CMD[@]}" </dev/null >"$OHA_BUILD_LOG" 2>&1); then
        show_tail "$OHA_BUILD_LOG"
        fail "building oha failed: ${OHA_INSTALL_CMD[*]}" "see $OHA_BUILD_LOG"
    fi
    [[ -x $OHA_BIN ]] || fail "cargo install succeeded but $OHA_BIN does not exist" "see $OHA_BUILD_LOG"
    log "oha: built in $((SECONDS - started))s"
    exec 9>&-
}

if [[ -n ${SLUICE_BENCH_OHA:-} ]]; then
    OHA=$SLUICE_BENCH_OHA
    [[ -x $OHA ]] || fail "SLUICE_BENCH_OHA='$OHA' is not executable" "fix it or unset it"
else
    OHA=$OHA_BIN
    if [[ ! -x $OHA || $(oha_version_of "$OHA") != "$OHA_VERSION" ]]; then
        build_oha
    fi
fi
OHA_FOUND_VERSION=$(oha_version_of "$OHA")
[[ -n $OHA_FOUND_VERSION ]] || fail "'$OHA --version' did not print a version"

log "nginx $NGINX_VERSION: $NGINX"
log "oha $OHA_FOUND_VERSION: $OHA"

exports=$(printf 'export SLUICE_BENCH_NGINX=%q\nexport SLUICE_BENCH_OHA=%q\n' "$NGINX" "$OHA")
printf '%s\n' "$exports" >"$ENV_FILE"
printf '%s\n' "$exports"
