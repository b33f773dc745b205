use pitr_tests::*;
#[test]
fn majors() -> anyhow::Result<()> {
    for m in [14u32, 16, 18, 15, 17] {
        let t = std::time::Instant::now();
        let _ = pg_bin_dir(m)?;
        let t1 = t.elapsed();
        let pg = PgCluster::start(PgOptions::new(m))?;
        eprintln!(
            "PG{m}: bin {:?}, start {:?}, {}",
            t1,
            t.elapsed() - t1,
            pg.psql("select version()")?
        );
        let t = std::time::Instant::now();
        pg.restart("fast")?;
        eprintln!("restart {:?}", t.elapsed());
    }
    eprintln!("pitr_bin = {:?}", pitr_bin());
    Ok(())
}
#[test]
#[ignore]
fn hang() {
    let pg = PgCluster::start(PgOptions::new(15)).unwrap();
    eprintln!("HANG {}", pg.data_dir.display());
    std::thread::sleep(std::time::Duration::from_secs(600));
}
