# Sourced by start-head.sh and start-cluster.sh (not run): the environment every `ray start` of
# keeper gets. Needs RAY (the ray executable) set; exports:
#   RAY_AUTH_MODE=token   `ray start` leaves token authentication off without it
#   RAY_AUTH_TOKEN        kept if set, else `ray get-auth-token --generate` (~/.ray/auth_token,
#                         created if missing and made readable by this user only)
#   PATH                  the directory of $RAY first: job entrypoints run `python` from the
#                         head's PATH, which must be the interpreter that runs this ray
export RAY_AUTH_MODE=token
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
    # Prints the token on stdout (a newline on stderr); creates ~/.ray/auth_token if missing.
    RAY_AUTH_TOKEN="$("$RAY" get-auth-token --generate 2>/dev/null)"
    # Ray writes the file world-readable; the token grants code execution on the cluster.
    if [[ -f "$HOME/.ray/auth_token" ]]; then chmod 600 "$HOME/.ray/auth_token"; fi
fi
if [[ -z "$RAY_AUTH_TOKEN" ]]; then
    echo "$(basename "$0"): no auth token (RAY_AUTH_TOKEN empty and get-auth-token gave none)" >&2
    exit 1
fi
export RAY_AUTH_TOKEN
ray_dir="$(cd "$(dirname "$(command -v "$RAY")")" && pwd)"
export PATH="$ray_dir:$PATH"
