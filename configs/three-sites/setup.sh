#!/usr/bin/env bash
# Creates the three example sites' keys, the consortium file listing their PeerIds, and
# the genesis model. Run it once; then start the three nodes (see README.md here).
# Set CELLSWARM to a built binary to skip `cargo run`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cellswarm="${CELLSWARM:-cargo run --release -q -p cellswarm-node --}"
cd "$here"
mkdir -p keys stores
for s in a b c; do
    if [ ! -f "keys/site-$s.key" ]; then
        $cellswarm keygen --out "keys/site-$s.key" > "keys/site-$s.peer"
    fi
done

write_consortium() {
    {
        echo "# The three-site example consortium, written by setup.sh."
        echo "name = \"three-sites-example\""
        [ -n "${1:-}" ] && echo "genesis = \"$1\""
        cat <<'TOML'

[model]
architecture = "unet"
depth = 3
base_channels = 8

[rounds]
min_peers = 2
collect_timeout = "5m"
merge_timeout = "1m"
max_rounds = 10

[aggregation]
strategy = "fedavg"
encoding = "f32"
max_update_norm = 10000.0
TOML
        port=7101
        for s in a b c; do
            printf '\n[[members]]\nname = "site-%s"\npeer_id = "%s"\naddresses = ["/ip4/127.0.0.1/tcp/%d"]\n' \
                "$s" "$(cat "keys/site-$s.peer")" "$port"
            port=$((port + 1))
        done
    } > consortium.toml
}

write_consortium ""
genesis=$($cellswarm genesis --config site-a.toml)
write_consortium "$genesis"
echo "consortium.toml written; genesis model $genesis"
echo "start the nodes (three terminals, or append &):"
for s in a b c; do
    echo "  cargo run --release -p cellswarm-node -- run --config configs/three-sites/site-$s.toml"
done
