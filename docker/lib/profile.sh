# shellcheck shell=sh
# desktune: login shells (SSH, the Jupyter terminal) get the notebooks' environment back after
# /etc/profile has reset PATH: the venv first, and the workspace as the starting directory.
case ":$PATH:" in
*:/opt/venv/bin:*) ;;
*) PATH=/opt/venv/bin:$PATH ;;
esac
VIRTUAL_ENV=/opt/venv
export PATH VIRTUAL_ENV
case $- in
*i*) [ -d "${WORKSPACE:-/workspace/work}" ] && [ "$PWD" = "$HOME" ] && { cd "${WORKSPACE:-/workspace/work}" || true; } ;;
esac
