#!/bin/sh
# Run once by the postgres image on a new data directory: the role pitr streams and backs up with,
# and the pg_hba line a replication connection needs ("all" does not cover it).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v pw="$PITR_REPLICATOR_PASSWORD" <<'SQL'
CREATE ROLE replicator WITH LOGIN REPLICATION PASSWORD :'pw';
GRANT pg_read_all_settings, pg_read_all_stats TO replicator;
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
