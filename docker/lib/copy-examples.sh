#!/usr/bin/env bash
# Copies the example notebooks into the workspace without ever overwriting a user's file.
# Usage: copy-examples.sh SRC_DIR DEST_DIR MANIFEST UID GID
#   MANIFEST lists the notebooks copied before: one the user deleted is not brought back, and
#   a notebook new in a later image is copied on its first start.
set -euo pipefail
src=${1:?usage: copy-examples.sh SRC_DIR DEST_DIR MANIFEST UID GID}
dest=${2:?}
manifest=${3:?}
uid=${4:?}
gid=${5:?}

shopt -s nullglob
notebooks=("$src"/*.ipynb)
((${#notebooks[@]})) || { echo "copy-examples.sh: no example notebooks in $src" >&2; exit 0; }
install -d -o "$uid" -g "$gid" "$dest" "$(dirname "$manifest")"
touch "$manifest"
chown "$uid:$gid" "$manifest"
copied=0
for nb in "${notebooks[@]}"; do
    name=$(basename "$nb")
    if grep -qxF "$name" "$manifest"; then continue; fi
    if [[ ! -e $dest/$name ]]; then
        install -o "$uid" -g "$gid" -m 0644 "$nb" "$dest/$name"
        copied=$((copied + 1))
    fi
    echo "$name" >>"$manifest"
done
echo "copy-examples.sh: copied $copied new example notebook(s) into $dest" >&2
