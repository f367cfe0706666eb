# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables set here are start.sh's
# Password handling for start.sh (sourced; the tests source it too). Secrets come from the
# environment or from files named by *_FILE (compose secrets), live only in shell variables
# that are not exported, and are removed from the environment before any child starts.

MIN_PASSWORD_LENGTH=8

# load_secret NAME: prints $NAME, or the content of the file named by $NAME_FILE (trailing
# newlines dropped, as editors add one). Both set is refused: which one wins would be a guess.
load_secret() {
    local name=$1 file_var="$1_FILE"
    local direct=${!name-} file=${!file_var-}
    if [[ -n $direct && -n $file ]]; then
        echo "start.sh: both $name and $file_var are set; set only one of them" >&2
        return 2
    fi
    if [[ -n $file ]]; then
        if [[ ! -f $file || ! -r $file ]]; then
            echo "start.sh: $file_var=$file is not a readable file; fix the path or the secret's mount" >&2
            return 2
        fi
        printf '%s' "$(<"$file")"
    else
        printf '%s' "$direct"
    fi
}

# check_password NAME VALUE: refuses passwords shorter than MIN_PASSWORD_LENGTH.
check_password() {
    if ((${#2} < MIN_PASSWORD_LENGTH)); then
        echo "start.sh: $1 has ${#2} characters; use at least $MIN_PASSWORD_LENGTH, or leave it unset to get a generated one printed in the logs" >&2
        return 2
    fi
}

generate_password() {
    python3 -c 'import secrets; print(secrets.token_urlsafe(18))'
}

# resolve_secrets: sets jupyter_password, ssh_password, ssh_public_key and
# generated_password (1 when jupyter_password was generated). SSH falls back to Jupyter's.
resolve_secrets() {
    jupyter_password=$(load_secret JUPYTER_PASSWORD) || return
    ssh_password=$(load_secret SSH_PASSWORD) || return
    ssh_public_key=$(load_secret SSH_PUBLIC_KEY) || return
    generated_password=0
    if [[ -z $jupyter_password ]]; then
        jupyter_password=$(generate_password) || return
        generated_password=1
    else
        check_password JUPYTER_PASSWORD "$jupyter_password" || return
    fi
    if [[ -z $ssh_password ]]; then
        ssh_password=$jupyter_password
    else
        check_password SSH_PASSWORD "$ssh_password" || return
    fi
}

# scrub_secret_env: unexports every password variable, the *_FILE pointers to them and
# JUPYTER_TOKEN* (which would turn token login back on next to the password).
scrub_secret_env() {
    local name
    for name in $(compgen -e); do
        case $name in
        JUPYTER_PASSWORD* | SSH_PASSWORD* | JUPYTER_TOKEN* | SSH_PUBLIC_KEY*) unset "$name" ;;
        esac
    done
}
