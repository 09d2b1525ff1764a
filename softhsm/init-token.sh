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

# One set-up at a time per data directory (the same lock file as hsmkms's embedded default).
exec 9>>"$data_dir/.init.lock"
flock 9

# A copied or moved data directory: its config still names the old place's token directory.
# Point it at its own when that holds a token (as hsmkms does on every start; SoftHSM2 would
# read a relative tokendir against the working directory, so it has to stay absolute).
configured=$(sed -n 's/^[[:space:]]*directories\.tokendir[[:space:]]*=[[:space:]]*//p' "$conf" | head -n1)
if [ "$configured" != "$data_dir/tokens" ] \
   && [ -n "$(find "$data_dir/tokens" -mindepth 2 -maxdepth 2 -name token.object -print -quit)" ]; then
    sed "s#^\([[:space:]]*directories\.tokendir[[:space:]]*=[[:space:]]*\).*#\1$data_dir/tokens#" "$conf" > "$conf.tmp"
    mv "$conf.tmp" "$conf"
    echo "init-token: $conf named $configured; now $data_dir/tokens" >&2
fi

# SoftHSM2 leaves out a token whose files it cannot read at that moment (another process is
# writing it): wait until it shows as many initialized tokens as the directory holds, so that
# a busy token is never mistaken for a missing one and initialized twice.
for _ in $(seq 300); do
    slots=$(softhsm2-util --show-slots 2>/dev/null)
    if grep -Eq "^[[:space:]]*Label:[[:space:]]*$label[[:space:]]*$" <<<"$slots"; then
        echo "export SOFTHSM2_CONF=$conf"
        exit 0
    fi
    shown=$(grep -Ec "^[[:space:]]*Initialized:[[:space:]]*yes" <<<"$slots" || true)
    on_disk=$(find "$data_dir/tokens" -mindepth 2 -maxdepth 2 -name token.object | wc -l)
    [ "$shown" -ge "$on_disk" ] && break
    sleep 0.1
done
[ "$shown" -ge "$on_disk" ] || { echo "init-token: $data_dir/tokens holds $on_disk token(s) but SoftHSM2 could read only $shown" >&2; exit 1; }

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
