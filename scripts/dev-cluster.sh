# Sourced by scripts/cpu-per-op and scripts/profile: a `calm dev` cluster (3 nodes, base port
# 7400, data in a temp dir) to measure, stopped by PID when the sourcing script exits.
#
# Before a measurement it waits until every group's leader sits on its preferred node, as
# `calm bench compare` does: the leaders spread over the three nodes. Right after start-up
# they often sit on one node, where the same workload costs much less CPU per op on this
# machine (fewer, larger batches; docs/benchmarks.md, "Where the leaders sit"), so an A/B that
# did not wait would compare two topologies.
#
# Sets: dir (temp dir), dev (the `calm dev` PID), nodes (the node PIDs, space-separated),
# endpoints (the client addresses), dev_bin (the calm binary).

# dev_cluster_start BIN LEADERS: LEADERS is `spread` (wait as above) or `any`.
dev_cluster_start() {
    local leaders=$2 script=${0##*/}
    dev_bin=$1
    case "$leaders" in
        spread | any) ;;
        *) echo "$script: --leaders takes spread or any, not '$leaders'" >&2; exit 2 ;;
    esac
    dir=$(mktemp -d /tmp/calm-"$script".XXXXXX)
    nodes=""
    "$dev_bin" dev --data-dir "$dir/data" --base-port 7400 >"$dir/dev.log" 2>&1 &
    dev=$!
    trap dev_cluster_stop EXIT
    for _ in $(seq 1 100); do
        grep -q "ready in" "$dir/dev.log" && break
        kill -0 "$dev" 2>/dev/null || { cat "$dir/dev.log" >&2; exit 1; }
        sleep 0.2
    done
    grep -q "ready in" "$dir/dev.log" || { echo "$script: the cluster did not become ready in 20 s" >&2; cat "$dir/dev.log" >&2; exit 1; }
    endpoints=127.0.0.1:7401,127.0.0.1:7402,127.0.0.1:7403
    # Group g's preferred leader is node g mod 3 + 1 (the nodes hand groups over every 3 s).
    if [ "$leaders" = spread ]; then
        command -v jq >/dev/null || { echo "$script: waiting for the leaders needs jq (apt-get install -y jq), or pass --leaders any" >&2; exit 1; }
        local settled=0
        for _ in $(seq 1 100); do
            if "$dev_bin" status -w json --endpoints 127.0.0.1:7401 2>/dev/null |
                jq -e '.groups | length > 0 and all(.leader == .group % 3 + 1)' >/dev/null; then
                settled=1
                break
            fi
            sleep 0.2
        done
        [ "$settled" = 1 ] || { echo "$script: the leaders did not reach their preferred nodes in 20 s" >&2; exit 1; }
    fi
    nodes=$(pgrep -f -- "serve .*--data-dir $dir/data" | tr '\n' ' ')
}

# dev_cluster_warm_up WORKLOAD OPS CONCURRENCY [BENCH FLAGS...]: a tenth of the run, unmeasured
# (connections, the first keys, the allocator's pools).
dev_cluster_warm_up() {
    local workload=$1 ops=$2 concurrency=$3
    shift 3
    "$dev_bin" bench "$workload" --ops $((ops / 10 + 1)) --concurrency "$concurrency" --endpoints "$endpoints" "$@" >/dev/null
}

dev_cluster_stop() {
    kill "$dev" 2>/dev/null || true
    wait "$dev" 2>/dev/null || true
    for p in $nodes; do kill "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
