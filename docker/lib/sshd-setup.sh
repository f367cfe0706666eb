#!/usr/bin/env bash
# Writes sshd's config and makes the host keys on first start.
# Usage: sshd-setup.sh CONFIG_FILE HOST_KEY_DIR USER PORT
#   HOST_KEY_DIR is a volume, so a re-created container keeps its fingerprint. Sessions get the
#   notebooks' PATH, venv and workspace through SetEnv (sshd reads only the first SetEnv line, so
#   every variable is on it), taken from this script's environment.
set -euo pipefail
config=${1:?usage: sshd-setup.sh CONFIG_FILE HOST_KEY_DIR USER PORT}
keydir=${2:?}
user=${3:?}
port=${4:?}

mkdir -p "$keydir" "$(dirname "$config")"
chmod 0700 "$keydir"
for type in ed25519 rsa; do
    key="$keydir/ssh_host_${type}_key"
    if [[ ! -s $key ]]; then
        rm -f "$key" "$key.pub"
        ssh-keygen -q -t "$type" -N '' -C "desktune-host" -f "$key"
        echo "sshd-setup.sh: made host key $(ssh-keygen -l -f "$key.pub")" >&2
    fi
done

setenv="PATH=$PATH"
for name in VIRTUAL_ENV WORKSPACE HF_HOME TRITON_CACHE_DIR TORCH_CUDA_ARCH_LIST; do
    value=${!name-}
    if [[ -n $value && $value != *[[:space:]\"]* ]]; then setenv+=" $name=$value"; fi
done

umask 022
cat >"$config" <<CONF
# Written by desktune's start.sh at every start: edits here are lost.
Port $port
HostKey $keydir/ssh_host_ed25519_key
HostKey $keydir/ssh_host_rsa_key
PermitRootLogin no
AllowUsers $user
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication yes
PermitEmptyPasswords no
KbdInteractiveAuthentication no
UsePAM no
X11Forwarding no
PrintMotd no
AcceptEnv LANG LC_*
Subsystem sftp internal-sftp
SetEnv $setenv
CONF
echo "$config"
