#!/usr/bin/env bash
# Clones the primary with pg_basebackup on first start, then runs as a hot standby.
set -euo pipefail
data=/var/lib/postgresql/data/pgdata
if [ ! -s "$data/PG_VERSION" ]; then
  until pg_basebackup -h pg-primary -U postgres -D "$data" -R -X stream -c fast; do
    echo "waiting for pg-primary"; rm -rf "$data"; sleep 1
  done
  chmod 700 "$data"
fi
exec postgres -D "$data" -c hot_standby=on
