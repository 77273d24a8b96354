#!/usr/bin/env bash
# Lets the replica stream WAL from the primary (docker-compose only).
set -euo pipefail
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
