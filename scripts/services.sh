#!/usr/bin/env bash
# Make Postgres, Redis and a Kafka-protocol broker (tansu) reachable on loopback
# for the Sluice tests (`make services`).
#
# For each service: use it if it already answers, start it if it is installed
# but stopped, install it if it is missing (Debian packages via apt-get; tansu
# via `cargo install`). Safe to run repeatedly; with everything up it only
# performs a few quick checks.
#
# stdout: `export ...` lines (eval or source them); the same lines are written
#         to ${SLUICE_CACHE_DIR}/services.env
# stderr: progress, prefixed "services:"
#
#   eval "$(bash scripts/services.sh)"
#
# Environment:
#   SLUICE_CACHE_DIR      cache/log dir            (default: $HOME/.cache/sluice)
#   SLUICE_PG_PORT        local Postgres port      (default: 5432)
#   SLUICE_REDIS_PORT     local Redis port         (default: 6379)
#   SLUICE_KAFKA_PORT     local tansu broker port  (default: 9092)
#   SLUICE_TEST_DATABASE_URL, SLUICE_TEST_REDIS_URL, SLUICE_TEST_KAFKA_BOOTSTRAP
#       if set, that service is only checked (not managed) and the value is used.
set -euo pipefail

CACHE_DIR=${SLUICE_CACHE_DIR:-${HOME:?HOME is not set; set SLUICE_CACHE_DIR}/.cache/sluice}
PG_PORT=${SLUICE_PG_PORT:-5432}
REDIS_PORT=${SLUICE_REDIS_PORT:-6379}
KAFKA_PORT=${SLUICE_KAFKA_PORT:-9092}

PG_TIMEOUT=60           # seconds for Postgres to accept queries after start
REDIS_TIMEOUT=60        # seconds for Redis to answer PING after start
TANSU_START_TIMEOUT=120 # seconds for tansu to accept TCP connections after start
TANSU_BUILD_WAIT=3600   # seconds to wait for someone else's tansu build / lock
LOCK_WAIT=600           # seconds to wait for another run starting Postgres/Redis

TANSU_ROOT=$CACHE_DIR/tansu
TANSU_BIN=$TANSU_ROOT/bin/tansu
TANSU_BUILD_LOG=$CACHE_DIR/tansu-build.log
TANSU_LOG=$CACHE_DIR/tansu.log
TANSU_PID_FILE=$CACHE_DIR/tansu.pid
TANSU_LOCK=$CACHE_DIR/tansu.lock
SERVICES_LOCK=$CACHE_DIR/services.lock
APT_LOG=$CACHE_DIR/apt.log
ENV_FILE=$CACHE_DIR/services.env
TANSU_INSTALL_CMD=(cargo install tansu --version 0.6.0 --locked --features "dynostore,postgres,libsql" --root "$TANSU_ROOT")

# File descriptors 8 (services.lock) and 9 (tansu.lock) hold flock locks. Every
# command that may leave a daemon behind (apt-get, pg_ctlcluster, redis-server,
# cargo, tansu) is run without inherited descriptors beyond 0-2 (run_clean),
# otherwise the daemon would hold our locks, or a caller's pipe (`$(...)`,
# `| tee`, make's jobserver), forever.

SCRIPT_NAME=services
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# tcp_open HOST PORT: does something accept TCP connections there?
tcp_open() {
    # shellcheck disable=SC2016 # $1/$2 are expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# wait_until TIMEOUT CMD...: retry CMD every 0.5 s until it succeeds or TIMEOUT s pass.
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.5
    done
}

check_port_var() {
    local name=$1 value=$2
    if ! [[ $value =~ ^[0-9]+$ ]] || ((10#$value < 1 || 10#$value > 65535)); then
        fail "$name='$value' is not a valid TCP port" "set it to a number between 1 and 65535"
    fi
}

need_root() {
    if ((EUID != 0)); then
        fail "$1 needs root, but this script runs as $(id -un)" \
            "re-run as root (e.g. sudo make services), or start the service yourself"
    fi
}

LOCKED_SERVICES=0
lock_services() {
    if ((LOCKED_SERVICES)); then
        return 0
    fi
    exec 8>"$SERVICES_LOCK"
    if ! flock -n 8; then
        log "another services.sh run is starting services; waiting for $SERVICES_LOCK"
        if ! flock -w "$LOCK_WAIT" 8; then
            fail "timed out after ${LOCK_WAIT}s waiting for $SERVICES_LOCK" \
                "another 'make services' seems stuck; check 'pgrep -af services.sh'"
        fi
    fi
    LOCKED_SERVICES=1
}

unlock_services() {
    if ((LOCKED_SERVICES)); then
        exec 8>&-
        LOCKED_SERVICES=0
    fi
}

APT_UPDATED=0
apt_install() {
    need_root "installing $*"
    if ! have apt-get; then
        fail "apt-get not found, cannot install: $*" "install it yourself, or point the SLUICE_TEST_* variables at existing services"
    fi
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q)
    if ((!APT_UPDATED)); then
        log "running apt-get update (log: $APT_LOG)"
        if ! run_clean "${apt[@]}" update </dev/null >>"$APT_LOG" 2>&1; then
            show_tail "$APT_LOG"
            fail "apt-get update failed" "see $APT_LOG; check network access and /etc/apt/sources.list*"
        fi
        APT_UPDATED=1
    fi
    log "installing $* with apt-get (log: $APT_LOG)"
    if ! run_clean "${apt[@]}" install -y "$@" </dev/null >>"$APT_LOG" 2>&1; then
        show_tail "$APT_LOG"
        fail "apt-get install -y $* failed" "see $APT_LOG; fix the cause and re-run"
    fi
}

# ---------------------------------------------------------------- Postgres ---

PG_URL=
PG_QUERY_OUT=

pg_tools_present() { have pg_isready && have psql; }

pg_ready() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -t 3 </dev/null; }

# pg_query [URL]: `select 1` as user postgres on 127.0.0.1 (or against URL).
pg_query() {
    local args=(-h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres)
    if (($#)); then
        args=("$1")
    fi
    if PG_QUERY_OUT=$(PGCONNECT_TIMEOUT=5 psql -X -w "${args[@]}" -Atc 'select 1' </dev/null 2>&1); then
        [[ $PG_QUERY_OUT == 1 ]]
    else
        return 1
    fi
}

pg_auth_failure() {
    fail "Postgres answers on 127.0.0.1:$PG_PORT, but 'select 1' as user postgres failed:" \
        "$PG_QUERY_OUT" \
        "The tests connect as $PG_URL, so that server needs 'trust' auth for user postgres" \
        "on 127.0.0.1 (pg_hba.conf: host all postgres 127.0.0.1/32 trust, then reload)." \
        "Alternatively set SLUICE_TEST_DATABASE_URL=postgres://USER:PASSWORD@127.0.0.1:$PG_PORT/DB" \
        "(or any other reachable server), or SLUICE_PG_PORT to use another local server."
}

# pg_up: 0 = ready and `select 1` works; 1 = not accepting connections. Exits on auth failure.
pg_up() {
    if ! pg_ready; then
        return 1
    fi
    if pg_query; then
        return 0
    fi
    pg_auth_failure
}

pg_has_cluster() { compgen -G '/etc/postgresql/*/main' >/dev/null; }

# pg_find_cluster: set PG_VER/PG_STATUS/PG_LOG for the "main" cluster configured on PG_PORT.
PG_VER='' PG_STATUS='' PG_LOG=''
pg_find_cluster() {
    local out ver name port status logfile
    if ! out=$(pg_lsclusters -h); then
        fail "pg_lsclusters failed" "check the postgresql-common installation"
    fi
    while read -r ver name port status _ _ logfile _; do
        if [[ $name == main && $port == "$PG_PORT" ]]; then
            PG_VER=$ver PG_STATUS=$status PG_LOG=$logfile
            return 0
        fi
    done <<<"$out"
    return 1
}

pg_cluster_log() {
    if [[ -n $PG_LOG && -f $PG_LOG ]]; then
        printf '%s\n' "$PG_LOG"
    else
        printf '%s\n' "/var/log/postgresql/postgresql-$PG_VER-main.log"
    fi
}

pg_ctl_cluster() { # ACTION
    local out=$CACHE_DIR/pg_ctlcluster.log
    if ! run_clean pg_ctlcluster --skip-systemctl-redirect "$PG_VER" main "$1" </dev/null >"$out" 2>&1; then
        show_tail "$out" 20
        show_tail "$(pg_cluster_log)"
        fail "'pg_ctlcluster --skip-systemctl-redirect $PG_VER main $1' failed" \
            "see the output and log above; fix the cause and re-run"
    fi
}

# Only for a cluster this script has just installed/created: trust auth on loopback, port.
pg_configure_new_cluster() {
    local conf=/etc/postgresql/$PG_VER/main
    local hba=$conf/pg_hba.conf
    local sp='[[:space:]]+'
    log "postgres: configuring the new test cluster $PG_VER/main: trust auth on 127.0.0.1/::1, port $PG_PORT"
    if [[ $PG_STATUS == online* ]]; then
        pg_ctl_cluster stop
    fi
    sed -i -E "s#^(host${sp}all${sp}all${sp}(127\\.0\\.0\\.1/32|::1/128)${sp})[^[:space:]]+#\\1trust#" "$hba"
    if ! grep -Eq "^host${sp}all${sp}all${sp}127\\.0\\.0\\.1/32${sp}trust" "$hba"; then
        # No stock loopback lines to rewrite: put ours first (first match wins).
        sed -i -e '1i host all all 127.0.0.1/32 trust' -e '1i host all all ::1/128 trust' "$hba"
    fi
    pg_conftool "$PG_VER" main set port "$PG_PORT" >&2
}

setup_postgres() {
    if [[ -n ${SLUICE_TEST_DATABASE_URL:-} ]]; then
        if ! have psql; then
            apt_install postgresql-client
        fi
        if ! pg_query "$SLUICE_TEST_DATABASE_URL"; then
            fail "SLUICE_TEST_DATABASE_URL is set, but 'select 1' against it failed:" \
                "$PG_QUERY_OUT" \
                "fix that server/URL, or unset SLUICE_TEST_DATABASE_URL to use a local server on 127.0.0.1:$PG_PORT"
        fi
        log "postgres: using SLUICE_TEST_DATABASE_URL from the environment (select 1 ok)"
        PG_URL=$SLUICE_TEST_DATABASE_URL
        return 0
    fi

    PG_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres
    if pg_tools_present && pg_up; then
        log "postgres: up on 127.0.0.1:$PG_PORT"
        return 0
    fi

    lock_services
    local new_cluster=0
    if ! pg_has_cluster && ! tcp_open 127.0.0.1 "$PG_PORT"; then
        log "postgres: not installed (no /etc/postgresql/*/main)"
        apt_install postgresql
        if ! pg_has_cluster; then
            # The package was already installed, but without a cluster.
            local ver
            ver=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)
            if [[ -z $ver ]] || ! have pg_createcluster; then
                fail "postgresql is installed but no server version was found under /usr/lib/postgresql" \
                    "reinstall it: apt-get install --reinstall postgresql"
            fi
            log "postgres: creating cluster $ver/main on port $PG_PORT"
            if ! run_clean pg_createcluster --port "$PG_PORT" "$ver" main </dev/null >>"$APT_LOG" 2>&1; then
                show_tail "$APT_LOG"
                fail "pg_createcluster --port $PG_PORT $ver main failed" "see the output above"
            fi
        fi
        new_cluster=1
    elif ! pg_tools_present; then
        apt_install postgresql-client
    fi

    # Someone (another run, apt's postinst) may have started it meanwhile.
    if ((!new_cluster)) && pg_up; then
        log "postgres: up on 127.0.0.1:$PG_PORT"
        return 0
    fi

    if ((new_cluster)); then
        PG_VER=$(find /etc/postgresql -mindepth 2 -maxdepth 2 -name main -printf '%P\n' | cut -d/ -f1 | sort -V | tail -n 1)
        PG_STATUS=$(pg_lsclusters -h "$PG_VER" main | awk '{print $4}')
        PG_LOG=
        pg_configure_new_cluster
        PG_STATUS=down
    elif ! pg_has_cluster; then
        local why
        # pg_isready fails here by definition; only its message is wanted.
        why=$(pg_isready -h 127.0.0.1 -p "$PG_PORT" 2>&1 </dev/null) || :
        fail "something listens on 127.0.0.1:$PG_PORT but does not accept Postgres connections ($why)" \
            "free the port, or set SLUICE_PG_PORT to the port of a local Postgres, or SLUICE_TEST_DATABASE_URL"
    elif ! pg_find_cluster; then
        fail "no Postgres cluster named 'main' is configured on port $PG_PORT" \
            "clusters on this machine:" "$(pg_lsclusters 2>&1)" \
            "set SLUICE_PG_PORT to the port of one of them (or SLUICE_TEST_DATABASE_URL)"
    fi

    if [[ $PG_STATUS == down* ]]; then
        log "postgres: starting cluster $PG_VER/main (pg_ctlcluster --skip-systemctl-redirect $PG_VER main start)"
        pg_ctl_cluster start
    else
        log "postgres: cluster $PG_VER/main is $PG_STATUS; waiting for it to accept connections on 127.0.0.1:$PG_PORT"
    fi

    if ! wait_until "$PG_TIMEOUT" pg_ready; then
        show_tail "$(pg_cluster_log)"
        fail "Postgres $PG_VER/main is not accepting connections on 127.0.0.1:$PG_PORT after ${PG_TIMEOUT}s" \
            "check the log above and listen_addresses/port in /etc/postgresql/$PG_VER/main/postgresql.conf" \
            "(pg_lsclusters shows the cluster state; start it with: pg_ctlcluster --skip-systemctl-redirect $PG_VER main start)"
    fi
    if ! pg_query; then
        pg_auth_failure
    fi
    log "postgres: up on 127.0.0.1:$PG_PORT (cluster $PG_VER/main)"
}

# ------------------------------------------------------------------- Redis ---

REDIS_URL=
REDIS_PING_OUT=

# redis_ping [URL]: does 127.0.0.1:REDIS_PORT (or URL) answer PING with PONG?
redis_ping() {
    local args=(-h 127.0.0.1 -p "$REDIS_PORT")
    if (($#)); then
        args=(--no-auth-warning -u "$1")
    fi
    if REDIS_PING_OUT=$(timeout 5 redis-cli "${args[@]}" ping </dev/null 2>&1); then
        [[ $REDIS_PING_OUT == PONG ]]
    else
        return 1
    fi
}

redis_not_loading() { redis_ping || [[ $REDIS_PING_OUT != LOADING* ]]; }

start_redis() {
    local dir=/var/lib/redis logdir=/var/log/redis logfile out=$CACHE_DIR/redis-server.out
    if ! mkdir -p "$dir" 2>/dev/null || [[ ! -w $dir ]]; then
        dir=$CACHE_DIR/redis
        mkdir -p "$dir"
    fi
    if mkdir -p "$logdir" 2>/dev/null && [[ -w $logdir ]]; then
        logfile=$logdir/ci.log
    else
        logfile=$CACHE_DIR/redis.log
    fi
    log "redis: starting redis-server on 127.0.0.1:$REDIS_PORT (log: $logfile)"
    if ! run_clean redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir "$dir" --logfile "$logfile" \
        </dev/null >"$out" 2>&1; then
        if [[ -s $out ]]; then
            show_tail "$out"
        fi
        show_tail "$logfile"
        fail "redis-server failed to start" "see the output above"
    fi
    if ! wait_until "$REDIS_TIMEOUT" redis_ping; then
        if [[ -s $out ]]; then
            show_tail "$out"
        fi
        show_tail "$logfile"
        fail "Redis does not answer PING on 127.0.0.1:$REDIS_PORT ${REDIS_TIMEOUT}s after starting it (last reply: ${REDIS_PING_OUT:-none})" \
            "see the log above; if the port is taken, set SLUICE_REDIS_PORT to a free port"
    fi
}

setup_redis() {
    if [[ -n ${SLUICE_TEST_REDIS_URL:-} ]]; then
        if ! have redis-cli; then
            apt_install redis-tools
        fi
        if ! redis_ping "$SLUICE_TEST_REDIS_URL"; then
            fail "SLUICE_TEST_REDIS_URL is set, but PING against it did not return PONG:" \
                "${REDIS_PING_OUT:-no reply}" \
                "fix that server/URL, or unset SLUICE_TEST_REDIS_URL to use a local server on 127.0.0.1:$REDIS_PORT"
        fi
        log "redis: using SLUICE_TEST_REDIS_URL from the environment (PONG)"
        REDIS_URL=$SLUICE_TEST_REDIS_URL
        return 0
    fi

    REDIS_URL=redis://127.0.0.1:$REDIS_PORT
    if have redis-cli && redis_ping; then
        log "redis: up on 127.0.0.1:$REDIS_PORT"
        return 0
    fi

    lock_services
    if ! have redis-cli; then
        if have redis-server || tcp_open 127.0.0.1 "$REDIS_PORT"; then
            apt_install redis-tools
        else
            log "redis: not installed"
            apt_install redis-server
        fi
    fi
    if redis_ping; then
        log "redis: up on 127.0.0.1:$REDIS_PORT"
        return 0
    fi
    if tcp_open 127.0.0.1 "$REDIS_PORT"; then
        if [[ $REDIS_PING_OUT == LOADING* ]]; then
            log "redis: loading its dataset; waiting"
            if wait_until "$REDIS_TIMEOUT" redis_not_loading && redis_ping; then
                log "redis: up on 127.0.0.1:$REDIS_PORT"
                return 0
            fi
        fi
        fail "something listens on 127.0.0.1:$REDIS_PORT but PING did not return PONG (reply: ${REDIS_PING_OUT:-none})" \
            "if it is a Redis with a password, set SLUICE_TEST_REDIS_URL=redis://:PASSWORD@127.0.0.1:$REDIS_PORT" \
            "otherwise stop that program or set SLUICE_REDIS_PORT to a free port"
    fi
    if ! have redis-server; then
        log "redis: redis-server not installed"
        apt_install redis-server
        # The package's service scripts may or may not have started it.
        if redis_ping; then
            log "redis: up on 127.0.0.1:$REDIS_PORT"
            return 0
        fi
    fi
    start_redis
    log "redis: up on 127.0.0.1:$REDIS_PORT"
}

# ------------------------------------------------------------------- tansu ---

KAFKA_BOOTSTRAP=

# port_owner PORT: name of the process listening on PORT (empty if unknown).
port_owner() {
    local out
    if ! have ss || ! out=$(ss -Hltnp "sport = :$1" 2>/dev/null); then
        return 0
    fi
    awk '!found && match($0, /users:\(\("[^"]*"/) { print substr($0, RSTART + 9, RLENGTH - 10); found = 1 }' <<<"$out"
}

# kafka_port_is_tansu: exits unless the listener on KAFKA_PORT is tansu (or unknown).
kafka_port_is_tansu() {
    local owner
    owner=$(port_owner "$KAFKA_PORT")
    if [[ -z $owner ]]; then
        log "tansu: something accepts connections on 127.0.0.1:$KAFKA_PORT; cannot tell which program (ss -ltnp shows no owner), assuming a Kafka broker"
    elif [[ $owner != tansu ]]; then
        fail "127.0.0.1:$KAFKA_PORT is in use by '$owner', not by the tansu broker" \
            "stop that program, or set SLUICE_KAFKA_PORT to a free port (tansu is started there)," \
            "or, if it is a Kafka broker you want the tests to use, set SLUICE_TEST_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT"
    fi
}

# Pid of a `cargo install tansu ... --root $TANSU_ROOT` not started by this run (prints it).
tansu_build_pid() {
    local procs
    if ! procs=$(pgrep -af 'cargo install tansu'); then
        return 1
    fi
    awk -v root="--root $TANSU_ROOT" '
        $2 ~ /(^|\/)cargo$/ && $3 == "install" && $4 == "tansu" && index($0, root) { print $1; found = 1 }
        END { exit !found }' <<<"$procs"
}

ensure_tansu_built() {
    if [[ -x $TANSU_BIN ]]; then
        return 0
    fi
    local pid
    if pid=$(tansu_build_pid); then
        pid=${pid%%$'\n'*}
        log "tansu: a 'cargo install tansu' into $TANSU_ROOT is already running (pid $pid); waiting for it (log: $TANSU_BUILD_LOG)"
        local deadline=$((SECONDS + TANSU_BUILD_WAIT)) next=$((SECONDS + 60))
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS >= deadline)); then
                fail "timed out after ${TANSU_BUILD_WAIT}s waiting for the tansu build (pid $pid)" \
                    "check $TANSU_BUILD_LOG; re-run once it has finished"
            fi
            if ((SECONDS >= next)); then
                log "tansu: still building ... ($(tail -n 1 "$TANSU_BUILD_LOG" 2>/dev/null | sed 's/^ *//'))"
                next=$((SECONDS + 60))
            fi
            sleep 2
        done
        if [[ ! -x $TANSU_BIN ]]; then
            show_tail "$TANSU_BUILD_LOG"
            fail "the running tansu build finished without producing $TANSU_BIN" \
                "see $TANSU_BUILD_LOG; re-run to try again (this script then builds it itself)"
        fi
        return 0
    fi

    if ! have cargo; then
        fail "tansu is not installed ($TANSU_BIN missing) and cargo is not available to build it" \
            "install Rust (https://rustup.rs) and re-run, or put a tansu binary at $TANSU_BIN," \
            "or point SLUICE_TEST_KAFKA_BOOTSTRAP at an existing Kafka broker"
    fi
    log "tansu: not installed; building it now with: ${TANSU_INSTALL_CMD[*]}"
    log "tansu: this takes ~10 minutes; progress goes to $TANSU_BUILD_LOG"
    local started=$SECONDS
    if ! run_clean "${TANSU_INSTALL_CMD[@]}" </dev/null >"$TANSU_BUILD_LOG" 2>&1; then
        show_tail "$TANSU_BUILD_LOG"
        fail "building tansu failed: ${TANSU_INSTALL_CMD[*]}" \
            "see $TANSU_BUILD_LOG (missing system packages such as a C compiler, pkg-config or" \
            "libssl-dev are the usual cause); fix it and re-run"
    fi
    if [[ ! -x $TANSU_BIN ]]; then
        show_tail "$TANSU_BUILD_LOG"
        fail "cargo install succeeded but $TANSU_BIN does not exist" "see $TANSU_BUILD_LOG"
    fi
    log "tansu: built in $((SECONDS - started))s"
}

start_tansu() {
    local url=tcp://127.0.0.1:$KAFKA_PORT pid
    log "tansu: starting broker on 127.0.0.1:$KAFKA_PORT (log: $TANSU_LOG, pid file: $TANSU_PID_FILE)"
    printf '===== %s: services.sh starts tansu broker on %s =====\n' "$(date '+%F %T')" "$url" >>"$TANSU_LOG"
    # setsid + nohup: own session, survives this script and make; no inherited fds
    # beyond 0-2 (redirected), so nobody waits on it. The subshell execs, so $! is
    # tansu's pid. Run from the cache dir because tansu loads ./.env if present.
    (
        cd "$CACHE_DIR"
        close_extra_fds
        exec setsid nohup "$TANSU_BIN" broker \
            --listener-url "$url" \
            --advertised-listener-url "$url" \
            --storage-engine memory://tansu/ \
            </dev/null >>"$TANSU_LOG" 2>&1
    ) &
    pid=$!
    printf '%s\n' "$pid" >"$TANSU_PID_FILE"

    local deadline=$((SECONDS + TANSU_START_TIMEOUT))
    until tcp_open 127.0.0.1 "$KAFKA_PORT"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_tail "$TANSU_LOG"
            fail "tansu (pid $pid) exited before listening on 127.0.0.1:$KAFKA_PORT" \
                "see the log above; if the port is taken, set SLUICE_KAFKA_PORT to a free port"
        fi
        if ((SECONDS >= deadline)); then
            show_tail "$TANSU_LOG"
            fail "tansu (pid $pid) is not accepting connections on 127.0.0.1:$KAFKA_PORT after ${TANSU_START_TIMEOUT}s" \
                "see the log above; stop it with: kill $pid"
        fi
        sleep 0.5
    done
    kafka_port_is_tansu
}

setup_kafka() {
    if [[ -n ${SLUICE_TEST_KAFKA_BOOTSTRAP:-} ]]; then
        local entry host port reachable=()
        local -a entries
        IFS=, read -r -a entries <<<"$SLUICE_TEST_KAFKA_BOOTSTRAP"
        for entry in "${entries[@]}"; do
            entry=${entry// /}
            host=${entry%:*} port=${entry##*:}
            host=${host#\[} host=${host%\]}
            if [[ -n $host && $port =~ ^[0-9]+$ ]] && tcp_open "$host" "$port"; then
                reachable+=("$entry")
            fi
        done
        if ((${#reachable[@]} == 0)); then
            fail "SLUICE_TEST_KAFKA_BOOTSTRAP=$SLUICE_TEST_KAFKA_BOOTSTRAP is set, but no host:port in it accepts TCP connections" \
                "start that broker, or unset SLUICE_TEST_KAFKA_BOOTSTRAP to use a local tansu on 127.0.0.1:$KAFKA_PORT"
        fi
        log "kafka: using SLUICE_TEST_KAFKA_BOOTSTRAP from the environment (reachable: ${reachable[*]})"
        KAFKA_BOOTSTRAP=$SLUICE_TEST_KAFKA_BOOTSTRAP
        return 0
    fi

    KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT
    if tcp_open 127.0.0.1 "$KAFKA_PORT"; then
        kafka_port_is_tansu
        log "tansu: up on 127.0.0.1:$KAFKA_PORT"
        return 0
    fi

    exec 9>"$TANSU_LOCK"
    if ! flock -n 9; then
        log "tansu: another services.sh run is building/starting tansu; waiting for $TANSU_LOCK (build log: $TANSU_BUILD_LOG)"
        if ! flock -w "$TANSU_BUILD_WAIT" 9; then
            fail "timed out after ${TANSU_BUILD_WAIT}s waiting for $TANSU_LOCK" \
                "another 'make services' seems stuck; check 'pgrep -af services.sh' and $TANSU_BUILD_LOG"
        fi
    fi
    if tcp_open 127.0.0.1 "$KAFKA_PORT"; then
        kafka_port_is_tansu
        log "tansu: up on 127.0.0.1:$KAFKA_PORT (started by another run)"
    else
        ensure_tansu_built
        start_tansu
        log "tansu: up on 127.0.0.1:$KAFKA_PORT"
    fi
    exec 9>&-
}

# -------------------------------------------------------------------- main ---

check_port_var SLUICE_PG_PORT "$PG_PORT"
check_port_var SLUICE_REDIS_PORT "$REDIS_PORT"
check_port_var SLUICE_KAFKA_PORT "$KAFKA_PORT"
PG_PORT=$((10#$PG_PORT)) REDIS_PORT=$((10#$REDIS_PORT)) KAFKA_PORT=$((10#$KAFKA_PORT))
mkdir -p "$CACHE_DIR"

setup_postgres
setup_redis
unlock_services
setup_kafka

exports=$(
    printf 'export SLUICE_TEST_DATABASE_URL=%q\n' "$PG_URL"
    printf 'export SLUICE_TEST_REDIS_URL=%q\n' "$REDIS_URL"
    printf 'export SLUICE_TEST_KAFKA_BOOTSTRAP=%q\n' "$KAFKA_BOOTSTRAP"
)
printf '%s\n' "$exports" >"$ENV_FILE.tmp.$$"
mv -f "$ENV_FILE.tmp.$$" "$ENV_FILE"
log "all services reachable (${SECONDS}s); env written to $ENV_FILE"
printf '%s\n' "$exports"
