#!/bin/sh
# Entry point of the petals-next images: runs its arguments (a petals-server or petals-gateway command) after
# two preparations.
#  1. A `--ready-file PATH` among the arguments is deleted first: one left by an earlier run of this container
#     must not make a healthcheck that looks for it pass before this run is up.
#  2. With PETALS_JOIN_READY_FILE set (the bootstrap peer's --ready-file, on a volume shared with it), it waits
#     for that file and appends `--initial-peers $PETALS_JOIN_ADDR/p2p/<the bootstrap's peer id>`, so services
#     join a private swarm whose peer id nobody had to copy by hand.
set -eu

previous=""
for arg in "$@"; do
    if [ "$previous" = "--ready-file" ]; then
        rm -f "$arg"
    fi
    previous=$arg
done

if [ -n "${PETALS_JOIN_READY_FILE:-}" ]; then
    : "${PETALS_JOIN_ADDR:?set it to the bootstrap address without /p2p, e.g. /dns/bootstrap/tcp/31337}"
    timeout_s=${PETALS_JOIN_TIMEOUT_S:-300}
    waited=0
    until [ -s "$PETALS_JOIN_READY_FILE" ]; do
        if [ "$waited" -ge "$timeout_s" ]; then
            echo "petals-entrypoint: no bootstrap ready file $PETALS_JOIN_READY_FILE after ${timeout_s}s" >&2
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    peer_id=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["peer_id"])' "$PETALS_JOIN_READY_FILE")
    echo "petals-entrypoint: joining through $PETALS_JOIN_ADDR/p2p/$peer_id" >&2
    set -- "$@" --initial-peers "$PETALS_JOIN_ADDR/p2p/$peer_id"
fi

exec "$@"
