#!/usr/bin/env bash
# desktune container entrypoint (tini runs it): sets up the workspace user, SSH and JupyterLab
# from the environment, checks the GPU, then supervises sshd and Jupyter. If either exits, the
# other is stopped and the container exits with that code (compose's restart policy restarts
# it); SIGTERM stops both within seconds.
#
# Environment (see docs/workstation.md): JUPYTER_PASSWORD[_FILE], SSH_PASSWORD[_FILE],
# SSH_PUBLIC_KEY[_FILE], PUID, PGID, REQUIRE_GPU=1, JUPYTER_PORT, SSH_PORT, WORKSPACE.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -d $here/lib ]]; then lib=$here/lib; else lib=/usr/local/lib/desktune; fi
user=desktune
workspace=${WORKSPACE:-/workspace/work}
jupyter_port=${JUPYTER_PORT:-8888}
ssh_port=${SSH_PORT:-22}
host_key_dir=/etc/ssh/host-keys
sshd_config=/etc/desktune/sshd_config
authorized_keys_mount=/etc/desktune/authorized_keys
examples_src=/usr/local/share/desktune/notebooks
stop_grace_s=10

# shellcheck source-path=SCRIPTDIR source=lib/secrets.sh
source "$lib/secrets.sh"

log() { echo "start.sh: $*" >&2; }

# as_user CMD...: runs CMD as the workspace user with the (already scrubbed) environment.
as_user() {
    env HOME="$home" USER="$user" LOGNAME="$user" SHELL=/bin/bash \
        setpriv --reuid="$uid" --regid="$gid" --init-groups -- "$@"
}

# install_login_secrets: the SSH password (hashed by chpasswd, read from stdin) and the
# authorized keys from SSH_PUBLIC_KEY[_FILE] and a mounted /etc/desktune/authorized_keys.
install_login_secrets() {
    printf '%s:%s\n' "$user" "$ssh_password" | chpasswd
    local ssh_dir=$home/.ssh keys
    install -d -m 0700 -o "$uid" -g "$gid" "$ssh_dir"
    keys=$(
        if [[ -r $authorized_keys_mount ]]; then cat "$authorized_keys_mount"; fi
        if [[ -n $ssh_public_key ]]; then printf '%s\n' "$ssh_public_key"; fi
    )
    printf '%s\n' "$keys" | awk 'NF && !/^#/ && !seen[$0]++' >"$ssh_dir/authorized_keys"
    chown "$uid:$gid" "$ssh_dir/authorized_keys"
    chmod 0600 "$ssh_dir/authorized_keys"
    log "SSH: user $user, password login on, $(wc -l <"$ssh_dir/authorized_keys") authorized key(s)"
}

preflight() {
    local args=()
    if [[ ${REQUIRE_GPU:-0} == 1 ]]; then args=(--require-gpu); fi
    if as_user timeout 300 desktune doctor "${args[@]}"; then return 0; fi
    if [[ ${REQUIRE_GPU:-0} == 1 ]]; then
        log "REQUIRE_GPU=1 and the GPU check above failed: not starting"
        exit 3
    fi
    log "WARNING: the GPU check above found problems; starting anyway (training may be CPU-only"
    log "WARNING: or fail). Set REQUIRE_GPU=1 to refuse to start instead."
}

stopping=0
on_signal() {
    stopping=1
    kill -TERM "$sshd_pid" "$jupyter_pid" 2>/dev/null || true
}

# stop_all PIDS...: TERM, then KILL whatever is still there after stop_grace_s.
stop_all() {
    kill -TERM "$@" 2>/dev/null || true
    local i
    for ((i = 0; i < stop_grace_s * 5; i++)); do
        kill -0 "$@" 2>/dev/null || break
        sleep 0.2
    done
    kill -KILL "$@" 2>/dev/null || true
    wait "$@" 2>/dev/null || true
}

run_services() {
    mkdir -p /run/sshd
    /usr/sbin/sshd -D -e -f "$sshd_config" &
    sshd_pid=$!
    (cd "$workspace" && exec env HOME="$home" USER="$user" LOGNAME="$user" SHELL=/bin/bash \
        setpriv --reuid="$uid" --regid="$gid" --init-groups -- jupyter lab --no-browser) &
    jupyter_pid=$!
    trap on_signal TERM INT
    local rc=0
    wait -n "$sshd_pid" "$jupyter_pid" || rc=$?
    if ((stopping)); then
        log "stop requested: stopping sshd and Jupyter"
        stop_all "$sshd_pid" "$jupyter_pid"
        exit 0
    fi
    local dead=sshd
    if ! kill -0 "$jupyter_pid" 2>/dev/null; then dead=jupyter; fi
    log "$dead exited with code $rc: stopping the other service, the container exits with $rc"
    stop_all "$sshd_pid" "$jupyter_pid"
    exit "$rc"
}

main() {
    resolve_secrets || exit 2
    scrub_secret_env

    local ids
    ids=$("$lib/setup-user.sh" "$user" "$workspace" "${HF_HOME:-}" "${TRITON_CACHE_DIR:-}")
    read -r uid gid <<<"$ids"
    home=$(getent passwd "$user" | cut -d: -f6)

    install_login_secrets
    install -d -m 0700 -o "$uid" -g "$gid" "$home/.jupyter"
    printf '%s' "$jupyter_password" | python3 "$lib/jupyter-config.py" \
        --out "$home/.jupyter/jupyter_server_config.json" --port "$jupyter_port" \
        --root-dir "$workspace" --owner "$uid:$gid"
    "$lib/sshd-setup.sh" "$sshd_config" "$host_key_dir" "$user" "$ssh_port" >/dev/null
    "$lib/copy-examples.sh" "$examples_src" "$workspace/examples" \
        "$workspace/.desktune/examples-copied" "$uid" "$gid"
    preflight

    log "JupyterLab: container port $jupyter_port (compose publishes it as http://localhost:8888)"
    log "SSH: ssh -p 2222 $user@localhost (container port $ssh_port)"
    if ((generated_password)); then
        log "no JUPYTER_PASSWORD was set; this generated one works for Jupyter and SSH until the"
        log "container restarts, and is shown only here: $jupyter_password"
    fi
    unset jupyter_password ssh_password
    run_services
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
