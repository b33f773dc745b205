//! The table part of the weekly partial-restore drill (`pitr drill --partial`): a random table of
//! the cluster as it was at a moment, restored the way `pitr restore --table` restores one
//! ([`crate::table`]: a scratch cluster at the moment, then the table copied with `pg_dump` and
//! `pg_restore`), and proved equal to the original.
//!
//! The copy never reaches a production database: it goes into a fresh database made for the
//! drill on the scratch server itself, which is stopped and removed afterwards. The proof compares
//! the table read in the scratch server before the copy (the cluster as restored) with the copy:
//! the row count and an md5 fingerprint of the rows, each row's text hashed and the hashes
//! sorted, so that neither row order nor the two databases' collations matter.

use std::time::Instant;

use pitr_archive::Repository;
use rand::seq::SliceRandom;

use crate::plan::Catalog;
use crate::table::{
    copy_table, default_new_name, quote_ident, ScratchCluster, ScratchOptions, ScratchTable, TableError, TableName,
    TableRef, TargetDatabase,
};
use crate::target::RecoveryTarget;

/// A table's rows in short: how many, and the md5 of their sorted md5s.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Fingerprint {
    /// Rows counted.
    pub rows: u64,
    /// md5 of the rows' md5s (of each row's text), sorted; `md5('')` for no rows.
    pub md5: String,
}

/// What the table part of a partial drill did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableDrill {
    /// The moment restored to.
    pub target: String,
    /// The base backup the scratch cluster was restored from.
    pub backup_id: String,
    /// The last commit replayed, when known.
    pub last_replayed_commit_time: Option<String>,
    /// Seconds to restore the scratch cluster to the moment (files and replay).
    pub restore_seconds: f64,
    /// Of those, replaying WAL.
    pub replay_seconds: Option<f64>,
    /// The data-loss window the scratch cluster achieved (the target minus the last commit
    /// replayed).
    pub data_loss_window_seconds: Option<f64>,
    /// The table drawn, with its database; `None` when the cluster had no table then.
    pub table: Option<ScratchTable>,
    /// Ordinary tables the cluster had at the moment (the draw's pool).
    pub tables_at_target: usize,
    /// The database made for the copy on the scratch server.
    pub drill_database: Option<String>,
    /// The copy's name there.
    pub copied_as: Option<TableName>,
    /// The original, read in the scratch server before the copy.
    pub original: Option<Fingerprint>,
    /// The copy, read in the drill's database.
    pub copy: Option<Fingerprint>,
    /// Rows the copy reported.
    pub copied_rows: Option<u64>,
    /// What the copy left out (foreign keys, triggers…), as `pitr restore --table` reports it.
    pub left_out: Vec<String>,
    /// Seconds the copy took (prepare, dump, restore).
    pub copy_seconds: Option<f64>,
}

impl TableDrill {
    /// Whether the copy equals the original (row count and fingerprint).
    pub fn equal(&self) -> bool {
        matches!((&self.original, &self.copy), (Some(a), Some(b)) if a == b)
    }
}

/// Restores the cluster of `catalog` to `target` in a scratch cluster (see
/// [`ScratchCluster::restore_at`]), draws one of its ordinary tables at random, copies it into a
/// fresh database on the scratch server with [`copy_table`] and fingerprints both. The scratch
/// cluster is removed before this returns, whatever happened.
pub async fn table_drill(
    repo: &Repository,
    catalog: &Catalog,
    target: RecoveryTarget,
    opts: &ScratchOptions,
) -> Result<TableDrill, TableError> {
    let started = Instant::now();
    let scratch = ScratchCluster::restore_at(repo, catalog, target, opts).await?;
    let restore_seconds = started.elapsed().as_secs_f64();
    let report = scratch.restore_report();
    let mut drill = TableDrill {
        target: report.target.clone(),
        backup_id: report.backup_id.clone(),
        last_replayed_commit_time: report.last_replayed_commit_time.clone(),
        restore_seconds,
        replay_seconds: report.replay_seconds,
        data_loss_window_seconds: report.data_loss_window_seconds,
        table: None,
        tables_at_target: 0,
        drill_database: None,
        copied_as: None,
        original: None,
        copy: None,
        copied_rows: None,
        left_out: Vec::new(),
        copy_seconds: None,
    };
    let result = copy_and_compare(&scratch, target, &mut drill).await;
    if let Err(e) = scratch.remove() {
        tracing::warn!(error = %e, "partial drill: could not remove the scratch cluster; remove it by hand");
    }
    result.map(|()| drill)
}

async fn copy_and_compare(
    scratch: &ScratchCluster,
    target: RecoveryTarget,
    drill: &mut TableDrill,
) -> Result<(), TableError> {
    let tables = scratch.list_tables().await?;
    drill.tables_at_target = tables.len();
    let Some(chosen) = tables.choose(&mut rand::thread_rng()).cloned() else { return Ok(()) };
    drill.table = Some(chosen.clone());
    drill.original = Some(fingerprint(scratch, &chosen.database, &chosen.table).await?);

    let database = format!("pitr_drill_{:08x}", rand::random::<u32>());
    execute(scratch, "postgres", &format!("create database {}", quote_ident(&database))).await?;
    drill.drill_database = Some(database.clone());
    execute(scratch, &database, &format!("create schema if not exists {}", quote_ident(&chosen.table.schema))).await?;
    let new_table = default_new_name(&chosen.table, target);
    let into = TargetDatabase::parse(&scratch.conninfo(&database))?;
    let source = TableRef { database: Some(chosen.database.clone()), table: chosen.table.clone() };
    let copy = copy_table(scratch, &source, &new_table, &into).await?;
    drill.copied_as = Some(copy.new_table.clone());
    drill.copied_rows = Some(copy.rows);
    drill.copy_seconds = Some(copy.seconds);
    drill.left_out = copy.left_out.iter().map(|l| format!("{} {} ({})", l.kind, l.name, l.detail)).collect();
    drill.copy = Some(fingerprint(scratch, &database, &copy.new_table).await?);
    Ok(())
}

async fn connect(scratch: &ScratchCluster, database: &str) -> Result<tokio_postgres::Client, TableError> {
    let (client, conn) = tokio_postgres::connect(&scratch.conninfo(database), tokio_postgres::NoTls)
        .await
        .map_err(|e| scratch_error(scratch, format!("connecting to database {database}: {e}")))?;
    tokio::spawn(conn);
    Ok(client)
}

fn scratch_error(scratch: &ScratchCluster, what: String) -> TableError {
    TableError::Scratch { dir: scratch.dir().to_path_buf(), what }
}

async fn execute(scratch: &ScratchCluster, database: &str, sql: &str) -> Result<(), TableError> {
    let client = connect(scratch, database).await?;
    client.batch_execute(sql).await.map_err(|e| scratch_error(scratch, format!("database {database}: {sql}: {e}")))
}

/// The SQL of [`Fingerprint`] for `table` (already quoted).
fn fingerprint_sql(quoted_table: &str) -> String {
    format!(
        "select count(*)::text, coalesce(md5(string_agg(h, '' order by h)), md5('')) \
         from (select md5(t::text) collate \"C\" as h from {quoted_table} t) rows"
    )
}

/// Row count and fingerprint of `table` in `database` of the scratch server.
async fn fingerprint(scratch: &ScratchCluster, database: &str, table: &TableName) -> Result<Fingerprint, TableError> {
    let client = connect(scratch, database).await?;
    let row = client
        .query_one(&fingerprint_sql(&table.quoted()), &[])
        .await
        .map_err(|e| scratch_error(scratch, format!("database {database}: fingerprinting {table}: {e}")))?;
    let (rows, md5): (String, String) = (row.get(0), row.get(1));
    let rows = rows.parse().map_err(|e| scratch_error(scratch, format!("row count {rows:?} of {table}: {e}")))?;
    Ok(Fingerprint { rows, md5 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_sorts_row_hashes_bytewise_and_quotes_the_table() {
        let sql = fingerprint_sql(&TableName { schema: "Sales".into(), name: "q\"1".into() }.quoted());
        assert!(sql.contains("from \"Sales\".\"q\"\"1\" t"), "{sql}");
        assert!(sql.contains("collate \"C\"") && sql.contains("order by h"), "{sql}");
        assert!(sql.contains("md5('')"), "an empty table has a fingerprint too: {sql}");
    }

    #[test]
    fn equal_needs_both_sides() {
        let f = Fingerprint { rows: 3, md5: "x".into() };
        let mut d = TableDrill {
            target: String::new(),
            backup_id: String::new(),
            last_replayed_commit_time: None,
            restore_seconds: 0.0,
            replay_seconds: None,
            data_loss_window_seconds: None,
            table: None,
            tables_at_target: 0,
            drill_database: None,
            copied_as: None,
            original: Some(f.clone()),
            copy: None,
            copied_rows: None,
            left_out: Vec::new(),
            copy_seconds: None,
        };
        assert!(!d.equal());
        d.copy = Some(Fingerprint { rows: 3, md5: "y".into() });
        assert!(!d.equal());
        d.copy = Some(f);
        assert!(d.equal());
    }
}
