# Sourced by start-head.sh and start-cluster.sh (not run): the environment every `ray start` of
# keeper gets. Needs RAY (the ray executable) set; exports:
#   RAY_AUTH_MODE=token   `ray start` leaves token authentication off without it
#   RAY_AUTH_TOKEN        kept if set, else `ray get-auth-token --generate` (~/.ray/auth_token,
#                         created if missing and made readable by this user only)
#   RAY_TOKEN_HINT        how a client shell gets that token, without printing it: a command
#                         that reads the file, or a note that it is the one this shell was given
#   PATH                  the directory of $RAY first: job entrypoints run `python` from the
#                         head's PATH, which must be the interpreter that runs this ray
export RAY_AUTH_MODE=token
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
    # Prints the token on stdout (a newline on stderr); creates ~/.ray/auth_token if missing.
    # Ray writes the file world-readable; the token grants code execution on the cluster, so
    # the file is created under umask 077 and made readable by this user only.
    RAY_AUTH_TOKEN="$(umask 077 && "$RAY" get-auth-token --generate 2>/dev/null)"
    if [[ -f "$HOME/.ray/auth_token" ]]; then chmod 600 "$HOME/.ray/auth_token"; fi
    RAY_TOKEN_HINT='export RAY_AUTH_TOKEN="$(ray get-auth-token 2>/dev/null)"   # from ~/.ray/auth_token'
else
    RAY_TOKEN_HINT='export RAY_AUTH_TOKEN=...   # the token this script was started with (not printed)'
fi
if [[ -z "$RAY_AUTH_TOKEN" ]]; then
    echo "$(basename "$0"): no auth token (RAY_AUTH_TOKEN empty and get-auth-token gave none)" >&2
    exit 1
fi
export RAY_AUTH_TOKEN
ray_dir="$(cd "$(dirname "$(command -v "$RAY")")" && pwd)"
export PATH="$ray_dir:$PATH"

# wait_job_api URL: until the dashboard's job API answers (it can lag the GCS by a few seconds),
# at most 60 s. curl where there is one (the token from stdin, -H @-: on curl's command line it
# would show in `ps`); else `ray job list`, which starts a Python process (~2 s) per try.
wait_job_api() {
    local url="$1"
    for _ in $(seq 120); do
        if command -v curl >/dev/null; then
            if printf 'Authorization: Bearer %s\n' "$RAY_AUTH_TOKEN" \
                | curl -fsS -o /dev/null -H @- "${url}/api/version" 2>/dev/null; then
                return 0
            fi
        elif "$RAY" job list --address "$url" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
}
