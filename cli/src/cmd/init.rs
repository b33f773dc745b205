//! `pitr init`: create the repository and, if missing, the key file (and the journal's signing
//! key, with `[journal]`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use pitr_archive::keys::master::create_key_file;
use pitr_archive::names::MARKER;
use pitr_archive::{LocalStore, PutOutcome, Repository};

use crate::config::Config;
use crate::open;

/// `pitr init`: creates the repository (and the key file, if missing) and binds each secondary
/// to it.
pub async fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let store = open::store(&config)?;
    // Before anything is created: a repository on storage that ignores conditional creates is
    // not to be started at all.
    open::check_conditional_create(&config).await?;
    // The key file is made only where it is the configured source and missing; a new key cannot
    // open an initialised repository, so refuse before leaving a useless key file.
    if let Some(key_file) = config.encryption.key_file.as_ref().filter(|p| !p.exists()) {
        if store.head(MARKER).await.context("[repository]")?.is_some() {
            bail!(
                "[encryption] key_file {} does not exist, but repository {} is already initialised with another key; \
                 set key_file to the key file it was initialised with",
                key_file.display(),
                store.location()
            );
        }
        let key = create_key_file(key_file).context("[encryption] key_file: creating it")?;
        println!(
            "created key file {} (master key {}, mode 0600): back it up apart from the repository; without it the archive cannot be read",
            key_file.display(),
            key.id
        );
    }
    // The journal's signing key: separate from the storage credentials and the encryption key.
    if let Some(path) = config.journal.as_ref().and_then(|j| j.signing_key_file.as_ref()) {
        let (signer, created) = super::keys::ensure_journal_key(path)?;
        println!(
            "{} journal signing key {} (key id {}); public_key = \"{}\": set it as [journal] public_key where verify runs",
            if created { "created" } else { "using" },
            path.display(),
            signer.key_id(),
            pitr_archive::journal::public_key_text(&signer.verifying_key())
        );
    }
    let keys = open::key_ring(&config)?;
    let master = keys.masters().active().clone();
    println!("master key {} from {}", master.id, master.source);
    if config.repository.url.is_none() {
        LocalStore::new(config.repository_path()).create_root().context("[repository] path")?;
    }
    let repo = Repository::new(store, keys);
    // An initialised repository is opened before anything is written: with the wrong keys, the
    // first put would leave a repository key under a master key that does not belong here.
    if repo.store().head(MARKER).await.context("[repository]")?.is_some() {
        repo.check().await.context("the repository is initialised, but the configured keys do not open it")?;
    }
    match repo.init().await.context("initialising the repository")? {
        PutOutcome::Created => println!("initialised repository {}", repo.location()),
        PutOutcome::AlreadyExists => {
            println!("repository {} was already initialised; the key opens it", repo.location())
        }
    }
    let active = repo.keys().active_info(repo.store().as_ref(), true).await.context("the active repository key")?;
    println!("repository key {} (wrapped by master key {}) seals new objects", active.id, active.master_key);
    // A secondary is the same repository: its marker is a copy of the primary's.
    for s in &config.repository.secondary {
        let entry = || format!("[[repository.secondary]] {:?}", s.name);
        if let Some(path) = &s.path {
            LocalStore::new(path).create_root().with_context(entry)?;
        }
        let secondary = open::secondary_store(s)?;
        let copied =
            pitr_archive::replicate::bind(repo.store().as_ref(), secondary.as_ref()).await.with_context(entry)?;
        println!(
            "secondary {} ({}): {}",
            s.name,
            secondary.location(),
            if copied {
                "initialised; `pitr stream` back-fills it at start, or run `pitr copy --to NAME` now"
            } else {
                "already a copy of this repository"
            }
        );
    }
    Ok(())
}
