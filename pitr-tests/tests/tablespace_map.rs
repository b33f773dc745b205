//! `pitr restore --tablespace-map OID=DIR`: a PostgreSQL 15 tablespace restored into a directory
//! of its own, outside the target, and the table in it readable once the server has replayed;
//! an existing empty directory is written into and kept; an unknown OID, a name or a DIR that is
//! a symbolic link is refused before anything is written.

use anyhow::{Context, Result};
use pitr_tests::checks::expect_failure;
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{scratch_dir, PgCluster, PgOptions};

#[test]
fn a_mapped_tablespace_is_restored_into_its_own_directory() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let ts_dir = scratch_dir("tablespace");
    pitr_tests::chown_to_pg_user(ts_dir.path())?;
    cluster.psql(&format!("create tablespace ts location '{}'", ts_dir.path().display()))?;
    cluster.psql("create table t (id int primary key, v text) tablespace ts")?;
    cluster.psql("insert into t select g, md5(g::text) from generate_series(1, 5000) g")?;
    let state = cluster.psql("select count(*) || ' ' || md5(string_agg(id || ':' || v, ',' order by id)) from t")?;
    let oid: u32 = cluster.psql("select oid from pg_tablespace where spcname = 'ts'")?.parse()?;

    let mut env = PitrEnv::new("pg15-tablespace-map", &cluster, "")?;
    env.init()?;
    env.share_with_pg_user()?;
    let _stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    env.run_ok(&["backup"])?;

    // Another host's layout: the tablespace goes to a directory of its own.
    let elsewhere = scratch_dir("mapped");
    pitr_tests::chown_to_pg_user(elsewhere.path())?;
    let mapped = elsewhere.path().join("ts");
    let refused = scratch_dir("refused");
    let refused_target = refused.path().join("data");
    let refused_arg = refused_target.display().to_string();
    for (map, phrases) in [
        (format!("{}={}", oid + 1000, mapped.display()), vec!["no tablespace with OID", "nothing was restored"]),
        (format!("ts={}", mapped.display()), vec!["not a tablespace OID", "not by name"]),
        (format!("{oid}=relative/ts"), vec!["absolute"]),
    ] {
        let args = ["restore", "--to", "latest", "--target-dir", &refused_arg, "--tablespace-map", &map];
        expect_failure(&env.config, &args, &phrases);
        assert!(!refused_target.exists(), "--tablespace-map {map} wrote the target");
        assert!(
            std::fs::read_dir(elsewhere.path())?.next().is_none(),
            "--tablespace-map {map} wrote beside the mapped directory"
        );
    }

    // A link in DIR's place is refused (naming it), nothing written through it or beside it.
    let link_dir = scratch_dir("link");
    let link = link_dir.path().join("ts");
    std::fs::create_dir(&mapped)?;
    std::os::unix::fs::symlink(&mapped, &link)?;
    let map = format!("{oid}={}", link.display());
    let args = ["restore", "--to", "latest", "--target-dir", &refused_arg, "--tablespace-map", &map];
    expect_failure(&env.config, &args, &["symbolic link", &link.display().to_string(), "nothing was restored"]);
    assert!(!refused_target.exists(), "--tablespace-map to a link wrote the target");
    assert!(std::fs::read_dir(&mapped)?.next().is_none(), "--tablespace-map to a link wrote through it");
    assert_eq!(std::fs::read_dir(link_dir.path())?.count(), 1, "--tablespace-map to a link wrote beside it");

    // An existing empty DIR (a mount point, say) is restored into and kept, not replaced.
    pitr_tests::chown_to_pg_user(elsewhere.path())?;
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&mapped)?);
    let map = format!("{oid}={}", mapped.display());
    let (restored, out) =
        env.restore_started("latest", cluster.bin_dir(), &["--tablespace-map", &map, "--json", "--timeout", "120s"])?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("the restore's JSON report")?;
    assert_eq!(report["mapped_tablespaces"][oid.to_string()], mapped.display().to_string(), "{report}");
    let restored_state =
        restored.psql("select count(*) || ' ' || md5(string_agg(id || ':' || v, ',' order by id)) from t")?;
    assert_eq!(restored_state, state, "the table in the mapped tablespace");
    assert_eq!(restored.psql(&format!("select pg_tablespace_location({oid})"))?, mapped.display().to_string());

    // The files are under the mapped directory, not under the target.
    let file = restored.psql("select pg_relation_filepath('t')")?;
    let below =
        file.strip_prefix(&format!("pg_tblspc/{oid}/")).with_context(|| format!("{file} is not in the tablespace"))?;
    let meta =
        std::fs::symlink_metadata(mapped.join(below)).with_context(|| format!("{below} under {}", mapped.display()))?;
    assert!(meta.is_file() && meta.len() > 0, "{below} under the mapped directory: {meta:?}");
    assert_eq!(std::fs::read_link(restored.target.join(format!("pg_tblspc/{oid}")))?, mapped);
    assert!(!restored.target.join("pitr_tablespaces").exists(), "the tablespace was also written inside the target");
    let names: Vec<String> = std::fs::read_dir(elsewhere.path())?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    assert_eq!(names, vec!["ts".to_string()], "nothing but the mapped directory beside it (no staging left)");
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&mapped)?),
        inode,
        "the existing mapped directory was replaced"
    );
    let inside: Vec<String> = std::fs::read_dir(&mapped)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    assert!(
        inside.len() == 1 && inside[0].starts_with("PG_15_"),
        "only the tablespace's version directory inside it (no staging left): {inside:?}"
    );
    Ok(())
}
