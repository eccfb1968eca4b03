# shellcheck shell=bash
# Helpers shared by the project's scripts. Source it after setting SCRIPT_NAME (the prefix of
# every line the script prints on stderr).

log() { printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2; }

# fail "what failed" ["detail or how to fix" ...]
fail() {
    log "ERROR: $1"
    shift
    local arg line
    for arg in "$@"; do
        while IFS= read -r line; do
            log "  $line"
        done <<<"$arg"
    done
    exit 1
}

# show_tail FILE [LINES]: print the end of a log file to stderr.
show_tail() {
    local file=$1 lines=${2:-30}
    if [[ -r $file && -s $file ]]; then
        log "----- last $lines lines of $file -----"
        tail -n "$lines" -- "$file" | sed "s/^/$SCRIPT_NAME: | /" >&2
        log "----- end of $file -----"
    else
        log "(log $file is missing or empty)"
    fi
}

have() { command -v "$1" >/dev/null 2>&1; }

# close_extra_fds: close every descriptor above 2 (our locks, a caller's pipes).
# Only for a subshell that is about to exec a command.
close_extra_fds() {
    local fd
    for fd in /proc/"$BASHPID"/fd/*; do
        fd=${fd##*/}
        if [[ $fd =~ ^[0-9]+$ ]] && ((fd > 2)); then
            eval "exec $fd>&-"
        fi
    done
    exec 8>&- 9>&- # in case /proc is not mounted
}

# run_clean CMD...: run CMD with only descriptors 0-2 (see close_extra_fds), so that a daemon
# it leaves behind holds neither our locks nor a caller's pipe.
run_clean() {
    (
        close_extra_fds
        exec "$@"
    )
}
