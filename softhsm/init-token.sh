#!/usr/bin/env bash
# Usage: softhsm/init-token.sh DATA_DIR [LABEL]
#
# Idempotent SoftHSM2 token set-up for hsmkms (and for anyone's CI):
#   DATA_DIR/softhsm2.conf   from softhsm/softhsm2.conf.template, tokendir = DATA_DIR/tokens
#   DATA_DIR/tokens/         the token directory (0700)
#   DATA_DIR/user.pin        random user PIN (0600)
#   DATA_DIR/so.pin          random SO PIN (0600)
# and a token labelled LABEL (default: hsmkms). When that token already exists it does nothing.
# Prints the `export SOFTHSM2_CONF=...` line to use the token.
set -euo pipefail
umask 077

data_dir=${1:?usage: init-token.sh DATA_DIR [LABEL]}
label=${2:-hsmkms}
here=$(cd "$(dirname "$0")" && pwd)

command -v softhsm2-util >/dev/null || { echo "init-token: softhsm2-util not found (apt-get install softhsm2)" >&2; exit 1; }

mkdir -p "$data_dir/tokens"
data_dir=$(cd "$data_dir" && pwd)
conf="$data_dir/softhsm2.conf"
if [ ! -f "$conf" ]; then
    sed "s#@TOKEN_DIR@#$data_dir/tokens#" "$here/softhsm2.conf.template" > "$conf"
fi
export SOFTHSM2_CONF="$conf"

if softhsm2-util --show-slots 2>/dev/null | grep -Eq "^[[:space:]]*Label:[[:space:]]*$label[[:space:]]*$"; then
    echo "export SOFTHSM2_CONF=$conf"
    exit 0
fi

for f in user.pin so.pin; do
    if [ ! -s "$data_dir/$f" ]; then
        # 32 hex characters from the kernel's generator; never shown on the terminal.
        od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$data_dir/$f"
    fi
done
# softhsm2-util takes PINs only as arguments (or from a terminal); the window is this one call.
softhsm2-util --init-token --free --label "$label" \
    --so-pin "$(cat "$data_dir/so.pin")" --pin "$(cat "$data_dir/user.pin")" >/dev/null
echo "export SOFTHSM2_CONF=$conf"
