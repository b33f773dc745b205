//! Phase 1: catch-up throughput. Per round a fresh cluster, both physical slots created before a
//! fixed amount of WAL is generated with no receiver running; then each receiver alone (one after
//! the other, order alternating per round) is timed until `pg_stat_replication.flush_lsn` reaches
//! the end LSN measured before it started.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use pitr_tests::{parse_lsn, u64_to_lsn, PgCluster};

use crate::opts::Opts;
use crate::receivers::{create_slot, current_lsn, spawn, wait_flushed, wal_segment_size, Kind, PITR_SLOT, RW_SLOT};
use crate::report::{Goal, Row};
use crate::util::{cpu_ticks, dir_bytes, log_tail, median, mibs, GIB, MIB};
use crate::Bench;

#[derive(Debug, Clone, Copy, Default)]
pub struct CatchupRun {
    pub secs: f64,
    pub cpu_secs: f64,
    pub out_bytes: u64,
    /// pitr only: objects put and plaintext bytes put (from its status file).
    pub puts: (u64, u64),
}

pub struct CatchupRound {
    pub first: Kind,
    pub generated: u64,
    pub streamed: u64,
    pub gen_secs: f64,
    pub pitr: CatchupRun,
    pub rw: CatchupRun,
}

/// Inserts `rows` rows of `repeat(md5(g::text), 3)` (the generator: 6 M rows ~ 918 MB of
/// WAL) into a new table `name`.
pub fn md5_rows(cluster: &PgCluster, name: &str, from: u64, rows: u64) -> Result<()> {
    cluster.psql(&format!(
        "create table if not exists {name}(id bigint, pad text); \
         insert into {name} select g, repeat(md5(g::text), 3) from generate_series({from}, {}) g",
        from + rows.max(1) - 1
    ))?;
    Ok(())
}

fn generator(o: &Opts) -> String {
    if o.md5_rows > 0 {
        format!("{} inserts of repeat(md5(g::text), 3)", o.md5_rows)
    } else if o.bulk_rows > 0 {
        format!("pgbench -i -s {} -q + {} rows of 128 random hex chars (bulk)", o.scale, o.bulk_rows)
    } else {
        format!("pgbench -i -s {} -q", o.scale)
    }
}

impl Bench {
    pub fn catchup_round(&self, round: usize) -> Result<CatchupRound> {
        let o = &self.opts;
        let cluster = crate::receivers::start_cluster(&["autovacuum = off"])?;
        let client = self.rt.block_on(cluster.client())?;
        cluster.psql("checkpoint")?;
        create_slot(&cluster, Kind::Pitr)?;
        create_slot(&cluster, Kind::Receivewal)?;
        let start = current_lsn(&cluster)?;
        let restart = parse_lsn(&cluster.psql(&format!(
            "select min(restart_lsn) from pg_replication_slots where slot_name in ('{PITR_SLOT}', '{RW_SLOT}')"
        ))?)?;
        let seg = wal_segment_size(&cluster)?;

        eprintln!("catchup round {round}: generating WAL ({}) ...", generator(o));
        let t = Instant::now();
        if o.md5_rows > 0 {
            md5_rows(&cluster, "gen", 1, o.md5_rows)?;
        } else {
            cluster.pgbench(&["-i", "-s", &o.scale.to_string(), "-q"])?;
            if o.bulk_rows > 0 {
                cluster.psql(&format!(
                    "create table bulk(id bigint, pad text); \
                     insert into bulk select g, md5(random()::text) || md5(random()::text) || \
                     md5(random()::text) || md5(random()::text) from generate_series(1, {}) g",
                    o.bulk_rows
                ))?;
            }
        }
        // Let the checkpointer finish before any timing starts.
        cluster.psql("checkpoint")?;
        let gen_secs = t.elapsed().as_secs_f64();
        let end = current_lsn(&cluster)?;
        // Both receivers start at the beginning of the slot's restart segment.
        let stream_start = restart - restart % seg;
        eprintln!(
            "catchup round {round}: WAL {} .. {} ({:.1} MiB generated, {:.1} MiB to stream) in {gen_secs:.1}s",
            u64_to_lsn(start),
            u64_to_lsn(end),
            (end - start) as f64 / MIB,
            (end - stream_start) as f64 / MIB
        );

        let mut pitr = CatchupRun::default();
        let mut rw = CatchupRun::default();
        let order = Kind::order(round);
        for kind in order {
            // Settle: no leftover I/O from the previous receiver's stop.
            std::thread::sleep(Duration::from_millis(500));
            let mut run = spawn(&cluster, kind, &format!("bench-cu{round}"), o)?;
            let elapsed = wait_flushed(&self.rt, &client, &mut run, end, Duration::from_secs(o.catchup_timeout_secs))?;
            let cpu = cpu_ticks(run.child.id()).unwrap_or(0) as f64 / self.tck;
            // The status file is rewritten every status_interval (1 s): read it after stopping.
            run.stop();
            let r = CatchupRun {
                secs: elapsed.as_secs_f64(),
                cpu_secs: cpu,
                out_bytes: dir_bytes(&run.out_dir),
                puts: run.pitr_puts().unwrap_or_default(),
            };
            eprintln!(
                "catchup round {round}: {:<13} {:.2}s  {:.1} MiB/s  cpu {:.2}s  (log {})",
                kind.label(),
                r.secs,
                mibs(end - stream_start, r.secs),
                r.cpu_secs,
                run.log.display()
            );
            if kind == Kind::Pitr {
                if o.pitr_log != "info" {
                    eprintln!("--- pitr stream log (last 25 lines) ---\n{}", log_tail(&run.log, 25));
                }
                pitr = r;
            } else {
                rw = r;
            }
        }
        Ok(CatchupRound { first: order[0], generated: end - start, streamed: end - stream_start, gen_secs, pitr, rw })
    }
}

/// The phase's own table; its summary rows.
pub fn report(r: &mut String, o: &Opts, rounds: &[CatchupRound]) -> Vec<Row> {
    let _ = writeln!(r, "\n-- 1. catch-up throughput (each receiver alone, same WAL, fresh cluster per round) --");
    let _ = writeln!(
        r,
        "WAL: checkpoint; create both slots (immediately_reserve); {}; checkpoint; end LSN = pg_current_wal_lsn(). \
         autovacuum=off.",
        generator(o)
    );
    let _ =
        writeln!(r, "time = receiver process spawn -> pg_stat_replication.flush_lsn >= end LSN (polled every 20 ms).");
    let _ = writeln!(
        r,
        "MiB/s = bytes streamed (end LSN - start of the slot's restart segment) / time; CPU = receiver utime+stime."
    );
    let _ = writeln!(
        r,
        "{:>5} {:>6} {:>9} {:>9} | {:>7} {:>8} {:>6} | {:>7} {:>8} {:>6} | {:>10}",
        "round", "first", "gen MiB", "strm MiB", "pitr s", "MiB/s", "cpu s", "rw s", "MiB/s", "cpu s", "pitr/rw"
    );
    let mut ratios = Vec::new();
    let (mut ps, mut rs) = (Vec::new(), Vec::new());
    for (i, c) in rounds.iter().enumerate() {
        let p = mibs(c.streamed, c.pitr.secs);
        let w = mibs(c.streamed, c.rw.secs);
        ratios.push(p / w);
        ps.push(p);
        rs.push(w);
        let _ = writeln!(
            r,
            "{:>5} {:>6} {:>9.1} {:>9.1} | {:>7.2} {:>8.1} {:>6.2} | {:>7.2} {:>8.1} {:>6.2} | {:>10.2}",
            i + 1,
            if c.first == Kind::Pitr { "pitr" } else { "rw" },
            c.generated as f64 / MIB,
            c.streamed as f64 / MIB,
            c.pitr.secs,
            p,
            c.pitr.cpu_secs,
            c.rw.secs,
            w,
            c.rw.cpu_secs,
            p / w
        );
    }
    let med_p = median(&ps);
    let med_r = median(&rs);
    let _ = writeln!(
        r,
        "median: pitr {med_p:.1} MiB/s, pg_receivewal {med_r:.1} MiB/s, ratio of medians pitr/pg_receivewal = {:.2}, \
         median of per-round ratios = {:.2}",
        med_p / med_r,
        median(&ratios)
    );
    let cpu_p = median(&rounds.iter().map(|c| c.pitr.cpu_secs / (c.streamed as f64 / GIB)).collect::<Vec<_>>());
    let cpu_r = median(&rounds.iter().map(|c| c.rw.cpu_secs / (c.streamed as f64 / GIB)).collect::<Vec<_>>());
    let _ = writeln!(r, "receiver CPU per GiB streamed (median): pitr {cpu_p:.2} s, pg_receivewal {cpu_r:.2} s");
    if let Some(c) = rounds.last() {
        let _ = writeln!(
            r,
            "output size (last round): pitr repository {:.1} MiB (zstd + AES-GCM sealed), pg_receivewal dir {:.1} MiB \
             (compress={})",
            c.pitr.out_bytes as f64 / MIB,
            c.rw.out_bytes as f64 / MIB,
            o.receivewal_compress
        );
        let (n, b) = c.pitr.puts;
        let _ = writeln!(
            r,
            "pitr puts (last round, from its status file): {n} objects, {:.1} MiB plaintext put for {:.1} MiB streamed \
             ({:.2}x)",
            b as f64 / MIB,
            c.streamed as f64 / MIB,
            b as f64 / c.streamed as f64
        );
    }
    let gen = median(&rounds.iter().map(|c| c.gen_secs).collect::<Vec<_>>());
    let _ = writeln!(r, "WAL generation (+ checkpoint) took {gen:.1}s per round (median)");

    let streamed = median(&rounds.iter().map(|c| c.streamed as f64 / MIB).collect::<Vec<_>>());
    let peer = if o.receivewal_compress == "none" { "plain".to_string() } else { o.receivewal_compress.clone() };
    vec![
        Row::new(format!("catch-up throughput, {streamed:.0} MiB (rw {peer})"), "MiB/s")
            .peer(med_r)
            .pitr(med_p)
            .ratio(med_p / med_r)
            .goal(Goal::RatioAtLeast(1.0)),
        Row::new("catch-up CPU per GiB streamed (ratio = pitr/rw)", "s")
            .peer(cpu_r)
            .pitr(cpu_p)
            .ratio(cpu_p / cpu_r)
            .goal(Goal::None),
    ]
}
