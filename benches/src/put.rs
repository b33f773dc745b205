//! Phase 8, put: the CPU of one WAL chunk put, in-process and without a server: pitr's seal and local
//! store put (`Repository::put_sealed` into the appending `LocalStore`, as the sidecar's
//! `pitr-wal` thread does them) against the write pattern of `pg_receivewal --synchronous` (the
//! same bytes written into a zero-filled segment file, then `fdatasync`).
//!
//! The lag phase's tps ratio moves by several percent from round to round, more than a put-path
//! change of a few microseconds can show; this phase measures that path alone, to the
//! microsecond, in seconds. The WAL is real: a pgbench run on a fresh primary, whose completed
//! segments are read back from `pg_wal`. Not measured here: receiving, the writer lease's check,
//! the uploader's bookkeeping and the feedback to the primary (the lag phase has them all).

use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pitr_archive::{KeyRing, LocalStore, ObjectKind, ObjectMeta, Repository};
use pitr_pgformat::segment::segment_file_name;
use pitr_tests::parse_lsn;

use crate::receivers::{pgbench_cluster, wal_segment_size};
use crate::report::Row;
use crate::util::median;
use crate::Bench;

/// Bytes of WAL per put: what the lag phase's puts average under `pgbench -c 4` here (its WAL
/// MiB over its put count).
pub const CHUNK: usize = 4096;
/// Any cluster id: the names only need to be well formed.
const SYSTEM_ID: u64 = 7_000_000_000_000_000_001;

#[derive(Debug, Clone, Copy)]
pub struct PutCost {
    pub puts: usize,
    pub user_us: f64,
    pub sys_us: f64,
    pub wall_us: f64,
}

impl PutCost {
    fn cpu_us(&self) -> f64 {
        self.user_us + self.sys_us
    }
}

pub struct PutResult {
    pub segments: usize,
    pub rounds: Vec<(PutCost, PutCost)>,
}

/// This thread's user and system CPU, µs.
fn thread_cpu() -> (f64, f64) {
    // SAFETY: getrusage fills the zeroed struct we pass and reads nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    let us = |tv: libc::timeval| tv.tv_sec as f64 * 1e6 + tv.tv_usec as f64;
    (us(usage.ru_utime), us(usage.ru_stime))
}

fn measured(puts: usize, f: impl FnOnce() -> Result<()>) -> Result<PutCost> {
    let ((u0, s0), t0) = (thread_cpu(), Instant::now());
    f()?;
    let (wall, (u1, s1)) = (t0.elapsed(), thread_cpu());
    let n = puts as f64;
    Ok(PutCost { puts, user_us: (u1 - u0) / n, sys_us: (s1 - s0) / n, wall_us: wall.as_secs_f64() * 1e6 / n })
}

/// Puts of [`CHUNK`] bytes in all of `segments` (a segment size is a multiple of it).
fn puts_of(segments: &[(String, Vec<u8>)]) -> usize {
    segments.iter().map(|(_, wal)| wal.len() / CHUNK).sum()
}

/// pitr's puts of every chunk, on a current-thread runtime as the sidecar's stream runs.
fn pitr_puts(dir: &Path, segments: &[(String, Vec<u8>)]) -> Result<PutCost> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let store = LocalStore::new(dir).appending();
    store.create_root()?;
    let repo = Repository::new(Arc::new(store), KeyRing::from_key("bench", [7; 32]));
    measured(puts_of(segments), || {
        rt.block_on(async {
            for (segment_file, wal) in segments {
                for from in (0..wal.len()).step_by(CHUNK) {
                    let to = from + CHUNK;
                    let name = pitr_archive::names::pg::wal_chunk(SYSTEM_ID, segment_file, from as u32, to as u32);
                    let meta = ObjectMeta {
                        timeline: 1,
                        start_lsn: from as u64,
                        end_lsn: to as u64,
                        ..ObjectMeta::plain(ObjectKind::WalChunk)
                    };
                    repo.put_sealed(&name, wal[from..to].to_vec(), meta).await?;
                }
            }
            Ok(())
        })
    })
}

/// pg_receivewal's pattern: each chunk written in place into a zero-filled segment file, then
/// fdatasync (the files are filled and synced before the clock starts, as it does on opening).
fn plain_writes(dir: &Path, segments: &[(String, Vec<u8>)]) -> Result<PutCost> {
    let mut files = Vec::new();
    for (segment_file, wal) in segments {
        let path = dir.join(segment_file);
        let file = std::fs::OpenOptions::new().create_new(true).write(true).open(&path)?;
        file.write_all_at(&vec![0; wal.len()], 0)?;
        file.sync_all()?;
        files.push(file);
    }
    measured(puts_of(segments), || {
        for (file, (_, wal)) in files.iter().zip(segments) {
            for from in (0..wal.len()).step_by(CHUNK) {
                file.write_all_at(&wal[from..from + CHUNK], from as u64)?;
                file.sync_data()?;
            }
        }
        Ok(())
    })
}

impl Bench {
    pub fn put_phase(&self) -> Result<PutResult> {
        let o = &self.opts;
        let (cluster, _client) = pgbench_cluster(&self.rt, "put", o.lag_scale)?;
        let lsn = |c: &pitr_tests::PgCluster| -> Result<u64> {
            let text = c.psql("select pg_current_wal_lsn()")?;
            parse_lsn(text.trim()).with_context(|| format!("an LSN from {text:?}"))
        };
        let seg = wal_segment_size(&cluster)?;
        let start = lsn(&cluster)?;
        let args = o.load_args(o.put_secs, 0);
        eprintln!("put: {}", crate::lag::pgbench_cmd(&args));
        cluster.pgbench(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        let end = lsn(&cluster)?;
        // The segments written whole during the load (never the first or the current one).
        let mut segments = Vec::new();
        for segno in (start / seg + 1)..(end / seg) {
            if segments.len() == o.put_segments {
                break;
            }
            // A fresh cluster is on timeline 1.
            let segment_file = segment_file_name(1, segno, seg);
            let path = cluster.wal_dir().join(&segment_file);
            let wal = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
            if wal.len() as u64 != seg {
                bail!("{} is {} bytes, not a segment of {seg}", path.display(), wal.len());
            }
            segments.push((segment_file, wal));
        }
        drop(cluster);
        if segments.is_empty() {
            bail!("pgbench wrote no whole WAL segment (give --put-secs more)");
        }
        let mut rounds = Vec::new();
        for round in 1..=o.rounds {
            let one = |pitr: bool| -> Result<PutCost> {
                let dir = pitr_tests::scratch_dir(if pitr { "bench-put-pitr" } else { "bench-put-plain" });
                if pitr {
                    pitr_puts(dir.path(), &segments)
                } else {
                    plain_writes(dir.path(), &segments)
                }
            };
            // Alternating order, as the other phases do.
            let (pitr, plain) = if round % 2 == 1 {
                let p = one(true)?;
                (p, one(false)?)
            } else {
                let w = one(false)?;
                (one(true)?, w)
            };
            eprintln!(
                "put round {round}: pitr {:.1} µs CPU per put, write+fdatasync {:.1} µs",
                pitr.cpu_us(),
                plain.cpu_us()
            );
            rounds.push((pitr, plain));
        }
        Ok(PutResult { segments: segments.len(), rounds })
    }
}

pub fn report(text: &mut String, o: &crate::opts::Opts, r: &PutResult) -> Vec<Row> {
    let _ = writeln!(
        text,
        "\n-- 8. put path: CPU of one WAL chunk put, in-process, no server ({} segment(s) of pgbench WAL in {} B chunks, {} round(s)) --",
        r.segments,
        CHUNK,
        o.rounds
    );
    let _ = writeln!(
        text,
        "pitr: Repository::put_sealed (zstd + AES-256-GCM) into the appending local store (a chunk log per segment); \
         peer: the same bytes written in place into a zero-filled segment file + fdatasync (pg_receivewal --synchronous's pattern)"
    );
    let _ = writeln!(text, "round what                  puts   user µs   sys µs   cpu µs   wall µs  (per put)");
    for (i, (pitr, plain)) in r.rounds.iter().enumerate() {
        for (what, c) in [("pitr put", pitr), ("write+fdatasync", plain)] {
            let _ = writeln!(
                text,
                "{:>5} {:<20} {:>6} {:>9.1} {:>8.1} {:>8.1} {:>9.1}",
                i + 1,
                what,
                c.puts,
                c.user_us,
                c.sys_us,
                c.cpu_us(),
                c.wall_us
            );
        }
    }
    let pitr: Vec<f64> = r.rounds.iter().map(|(p, _)| p.cpu_us()).collect();
    let plain: Vec<f64> = r.rounds.iter().map(|(_, w)| w.cpu_us()).collect();
    let user: Vec<f64> = r.rounds.iter().map(|(p, _)| p.user_us).collect();
    let (pitr, plain) = (median(&pitr), median(&plain));
    let _ = writeln!(
        text,
        "medians: pitr {pitr:.1} µs CPU per put ({:.1} of it user), write+fdatasync {plain:.1} µs; ratio {:.2}",
        median(&user),
        pitr / plain
    );
    vec![Row::new("CPU per 4 KiB chunk put (no server)", "us").peer(plain).pitr(pitr).ratio(pitr / plain)]
}
