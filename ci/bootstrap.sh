#!/usr/bin/env bash
# Installs what `make run` and `make test` need, when it is missing:
#   - softhsm2, opensc and postgresql through apt-get (sudo when not root; the tests run their
#     own throwaway PostgreSQL server with initdb/pg_ctl: the packaged cluster is not used),
#     and chromium (browser tests),
#   - a container engine for the container smoke test (tests/test_container.py): when neither
#     docker nor podman can run a container, Debian's podman, runc and debootstrap
#     (HSMKMS_CONTAINER_TESTS=0 skips this, and the test then says why it is skipped),
#   - libnss3-tools and p11-kit-modules, and an NSS softokn module file for p11-kit (the second
#     PKCS#11 vendor of tests/test_nss_token.py; HSMKMS_NSS_TESTS=0 skips this),
#   - node and npm (Debian's, when there is no node), then the JavaScript SDK's locked packages
#     (tests/js/package-lock.json) with `npm ci`,
#   - uv (pinned) into .cache/uv-venv, then the locked Python dependencies into .venv, and the
#     AWS Encryption SDK CLI's own locked environment (tests/esdk_cli) into .cache/esdk-cli-venv,
#     both compiled to bytecode, and hsmkms's own modules compiled too.
# Idempotent and non-interactive: safe in CI (no terminal, no standard input).
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9

have_initdb() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }

if ! command -v softhsm2-util >/dev/null 2>&1 || [ ! -e /usr/lib/softhsm/libsofthsm2.so ] \
   || ! command -v pkcs11-tool >/dev/null 2>&1 || ! have_initdb; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    echo "bootstrap: installing softhsm2, opensc and postgresql with apt-get" >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        softhsm2 opensc postgresql </dev/null >/dev/null
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

apt_install() {
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: no apt-get here: install $* yourself" >&2
        return 0
    fi
    echo "bootstrap: installing $* with apt-get" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" </dev/null >/dev/null
}

# A container engine that can run containers (a docker client without a daemon cannot).
if [ "${HSMKMS_CONTAINER_TESTS:-1}" != 0 ] \
   && ! { command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; }; then
    missing=()
    for tool in podman runc debootstrap; do
        command -v "$tool" >/dev/null 2>&1 || command -v "/usr/sbin/$tool" >/dev/null 2>&1 \
            || missing+=("$tool")
    done
    if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
fi

# A second PKCS#11 vendor for tests/test_nss_token.py: NSS softokn through p11-kit-proxy (it
# cannot be loaded directly: its C_Initialize needs its configuration string). p11-kit reads a
# module file from /etc/pkcs11/modules only; its NSS database lives in NSS_DIR, which the test
# makes afresh in each run. SoftHSM2 is kept out of the proxy (hsmkms loads it directly).
NSS_DIR=/var/lib/hsmkms-ci/nss
if [ "${HSMKMS_NSS_TESTS:-1}" != 0 ]; then
    missing=()
    command -v certutil >/dev/null 2>&1 || missing+=(libnss3-tools)
    [ -e /usr/lib/x86_64-linux-gnu/p11-kit-proxy.so ] || compgen -G "/usr/lib/*/p11-kit-proxy.so" \
        >/dev/null || missing+=(p11-kit-modules)
    compgen -G "/usr/lib/*/libsoftokn3.so" >/dev/null || missing+=(libnss3)
    if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
    softokn=$(compgen -G "/usr/lib/*/libsoftokn3.so" | head -n 1 || true)
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo -n"; fi
    if [ -n "$softokn" ] && [ ! -f /etc/pkcs11/modules/hsmkms-nss-ci.module ] \
       && $sudo mkdir -p /etc/pkcs11/modules "$NSS_DIR" 2>/dev/null; then
        echo "bootstrap: registering the NSS softokn test token with p11-kit" >&2
        printf '%s\n' "# hsmkms tests: the NSS softokn token (ci/bootstrap.sh)" \
            "module: $softokn" \
            "x-init-reserved: configdir='sql:$NSS_DIR' certPrefix='' keyPrefix='' secmod='secmod.db' flags=" \
            | $sudo tee /etc/pkcs11/modules/hsmkms-nss-ci.module >/dev/null
        printf '%s\n' "# hsmkms: SoftHSM2 is loaded directly, not through p11-kit-proxy (ci/bootstrap.sh)" \
            "module: $(compgen -G '/usr/lib/*/softhsm/libsofthsm2.so' | head -n 1 || echo libsofthsm2.so)" \
            "disable-in: p11-kit-proxy" \
            | $sudo tee /etc/pkcs11/modules/softhsm2.module >/dev/null
        $sudo chmod 0777 "$NSS_DIR"
    fi
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
fi
if command -v npm >/dev/null 2>&1 && { [ ! -f tests/js/node_modules/.package-lock.json ] \
        || [ tests/js/package-lock.json -nt tests/js/node_modules/.package-lock.json ]; }; then
    echo "bootstrap: installing the JavaScript SDK (npm ci in tests/js)" >&2
    (cd tests/js && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
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

if [ ! -f .cache/esdk-cli-venv/.synced ] || [ tests/esdk_cli/uv.lock -nt .cache/esdk-cli-venv/.synced ]; then
    echo "bootstrap: syncing the AWS Encryption SDK CLI into .cache/esdk-cli-venv" >&2
    UV_PROJECT_ENVIRONMENT="$PWD/.cache/esdk-cli-venv" .cache/uv-venv/bin/uv sync --frozen --quiet \
        --project tests/esdk_cli --python python3 --compile-bytecode
    touch .cache/esdk-cli-venv/.synced
fi

# hsmkms itself is installed editable, so nothing compiled its modules. Where
# PYTHONDONTWRITEBYTECODE is set (CI runners, some shells), every `hsmkms` process would compile
# all of them from source again: about 0.3 s of CPU per command or server worker on a 2-core VM,
# paid by each of the suite's CLI and server processes. Only changed files are compiled again.
.venv/bin/python -m compileall -q hsmkms >/dev/null
