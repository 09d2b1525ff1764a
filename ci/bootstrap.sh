#!/usr/bin/env bash
# Installs what `make run` and `make test` need, when it is missing:
#   - softhsm2 and opensc through apt-get (sudo when not root), and chromium (browser tests),
#   - uv (pinned) into .cache/uv-venv, then the locked Python dependencies into .venv.
# Idempotent and non-interactive: safe in CI (no terminal, no standard input).
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9

if ! command -v softhsm2-util >/dev/null 2>&1 || [ ! -e /usr/lib/softhsm/libsofthsm2.so ] \
   || ! command -v pkcs11-tool >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    echo "bootstrap: installing softhsm2 and opensc with apt-get" >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 opensc </dev/null >/dev/null
fi

# Debian's chromium, for the console's browser tests (Playwright drives /usr/bin/chromium; it
# never downloads a browser of its own).
if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    echo "bootstrap: installing chromium with apt-get" >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium </dev/null >/dev/null
fi

if [ ! -x .cache/uv-venv/bin/uv ]; then
    echo "bootstrap: installing uv $UV_VERSION into .cache/uv-venv" >&2
    python3 -m venv .cache/uv-venv
    .cache/uv-venv/bin/python -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
fi

if [ ! -f .venv/.synced ] || [ pyproject.toml -nt .venv/.synced ] || [ uv.lock -nt .venv/.synced ]; then
    echo "bootstrap: syncing Python dependencies into .venv" >&2
    UV_PROJECT_ENVIRONMENT=.venv .cache/uv-venv/bin/uv sync --frozen --quiet --all-extras --compile-bytecode --python python3
    touch .venv/.synced
fi
