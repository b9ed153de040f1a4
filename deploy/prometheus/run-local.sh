#!/usr/bin/env bash
# Prometheus with the shipped config and alert rules, scraping a camex-server on this machine:
# no Docker, the Debian `prometheus` binary, bound to 127.0.0.1 (`make monitor` runs this).
#
#   deploy/prometheus/run-local.sh [SERVER_ADDR] [LISTEN_ADDR]
#     SERVER_ADDR   host:port of the camex-server to scrape     (default 127.0.0.1:8080)
#     LISTEN_ADDR   where Prometheus serves its UI and API       (default 127.0.0.1:9090)
#   env PROMETHEUS_DATA  generated config + time-series storage  (default ~/.cache/camex-serve/prometheus)
#   env PROMETHEUS       the prometheus binary                    (default: the one on PATH)
#
# The config is deploy/prometheus/prometheus.yml with three substitutions: the compose target
# `camex-server:8080` becomes SERVER_ADDR, Prometheus's own target becomes LISTEN_ADDR, and the
# rule file is given by absolute path (the generated config lives elsewhere). Job names,
# intervals and alerts are the shipped ones, so the Grafana dashboard works unchanged.
# Prometheus runs in the foreground (exec: its PID is this script's); stop it with Ctrl-C.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
server="${1:-127.0.0.1:8080}"
listen="${2:-127.0.0.1:9090}"
data="${PROMETHEUS_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/camex-serve/prometheus}"
prometheus="${PROMETHEUS:-$(command -v prometheus || true)}"

if [ -z "$prometheus" ]; then
    echo "run-local.sh: prometheus not found; install it: sudo apt-get install -y prometheus" >&2
    exit 1
fi
for want in '"camex-server:8080"' '"localhost:9090"' '- alerts.yml'; do
    if ! grep -qF -- "$want" "$here/prometheus.yml"; then
        echo "run-local.sh: $here/prometheus.yml no longer contains $want; update this script" >&2
        exit 1
    fi
done

mkdir -p "$data"
sed -e "s|\"camex-server:8080\"|\"$server\"|" \
    -e "s|\"localhost:9090\"|\"$listen\"|" \
    -e "s|- alerts.yml|- $here/alerts.yml|" \
    "$here/prometheus.yml" > "$data/prometheus.yml"

echo "Prometheus on http://$listen scraping http://$server/metrics (config and data in $data)" >&2
exec "$prometheus" --config.file="$data/prometheus.yml" --storage.tsdb.path="$data/tsdb" \
    --web.listen-address="$listen" --storage.tsdb.retention.time=15d
