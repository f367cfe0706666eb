#!/usr/bin/env bash
# Gives the workspace user the UID/GID of the mounted workspace's owner (or PUID/PGID), so files
# written from Jupyter or SSH belong to the host user.
# Usage: setup-user.sh [--dry-run] USER WORKSPACE [EXTRA_DIR...]
#   Prints "UID GID". --dry-run only decides (the tests run it on the host). EXTRA_DIRs (the
#   volumes inside the home: HF cache, Triton cache) are re-owned when their owner differs.
set -euo pipefail

dry_run=0
if [[ ${1-} == --dry-run ]]; then dry_run=1; shift; fi
user=${1:?usage: setup-user.sh [--dry-run] USER WORKSPACE [EXTRA_DIR...]}
workspace=${2:?usage: setup-user.sh [--dry-run] USER WORKSPACE [EXTRA_DIR...]}
shift 2
default_id=1000

is_id() { [[ $1 =~ ^[0-9]+$ ]]; }

read -r ws_uid ws_gid < <(stat -c '%u %g' "$workspace")
if [[ -n ${PUID-} ]]; then
    is_id "$PUID" || { echo "setup-user.sh: PUID=$PUID is not a number" >&2; exit 2; }
    uid=$PUID
    gid=${PGID:-$PUID}
    source="PUID/PGID"
elif ((ws_uid != 0)); then
    uid=$ws_uid
    gid=${PGID:-$ws_gid}
    source="owner of $workspace"
else
    # A workspace Docker created for a missing ./work belongs to root: take the default user
    # and hand the (top of the) workspace to it below.
    uid=$default_id
    gid=${PGID:-$default_id}
    source="default ($workspace belongs to root)"
fi
is_id "$gid" || { echo "setup-user.sh: PGID=$gid is not a number" >&2; exit 2; }
if ((uid == 0)); then
    echo "setup-user.sh: refusing to run the workspace user as root (UID 0, from $source); set PUID to your own UID (\`id -u\` on the host)" >&2
    exit 2
fi
echo "setup-user.sh: workspace user $user gets UID $uid GID $gid ($source)" >&2

if ((dry_run)); then
    echo "$uid $gid"
    exit 0
fi

# -o: the IDs may already be taken by another account of the base image; sharing is harmless.
if [[ $(id -g "$user") != "$gid" ]]; then groupmod -o -g "$gid" "$user"; fi
if [[ $(id -u "$user") != "$uid" ]]; then usermod -o -u "$uid" -g "$gid" "$user"; fi
if getent group desktune-venv >/dev/null; then usermod -a -G desktune-venv "$user"; fi

home=$(getent passwd "$user" | cut -d: -f6)
# -xdev: volumes mounted inside the home are handled below, once, not at every start.
find "$home" -xdev \( ! -user "$uid" -o ! -group "$gid" \) -exec chown -h "$uid:$gid" {} +
for dir in "$@"; do
    mkdir -p "$dir"
    if [[ $(stat -c '%u %g' "$dir") != "$uid $gid" ]]; then chown -R "$uid:$gid" "$dir"; fi
done
if ((ws_uid == 0)); then chown "$uid:$gid" "$workspace"; fi
echo "$uid $gid"
