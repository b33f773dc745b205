//! `pitr init`: create the repository and, if missing, the key file.

use std::path::Path;

use anyhow::{bail, Context, Result};
use pitr_archive::names::MARKER;
use pitr_archive::{KeyRing, LocalStore, PutOutcome, Repository};

use crate::config::Config;
use crate::open;

/// `pitr init`: creates the repository (and the key file, if missing) and binds each secondary
/// to it.
pub async fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let key_file = &config.encryption.key_file;
    let store = open::store(&config)?;
    // Before anything is created: a repository on storage that ignores conditional creates is
    // not to be started at all.
    open::check_conditional_create(&config).await?;
    let keys = if key_file.exists() {
        let keys = KeyRing::load(key_file).context("[encryption] key_file")?;
        println!("using existing key file {} (active key {})", key_file.display(), keys.active().id);
        keys
    } else {
        // A new key cannot open an initialised repository: refuse before leaving a useless key file.
        if store.head(MARKER).await.context("[repository]")?.is_some() {
            bail!(
                "[encryption] key_file {} does not exist, but repository {} is already initialised with another key; \
                 set key_file to the key file it was initialised with",
                key_file.display(),
                store.location()
            );
        }
        let keys = KeyRing::create(key_file).context("[encryption] key_file: creating it")?;
        println!(
            "created key file {} (key {}, mode 0600): back it up apart from the repository; without it the archive cannot be read",
            key_file.display(),
            keys.active().id
        );
        keys
    };
    if config.repository.url.is_none() {
        LocalStore::new(config.repository_path()).create_root().context("[repository] path")?;
    }
    let repo = Repository::new(store, keys);
    match repo.init().await.context("initialising the repository")? {
        PutOutcome::Created => println!("initialised repository {}", repo.location()),
        PutOutcome::AlreadyExists => {
            println!("repository {} was already initialised; the key opens it", repo.location())
        }
    }
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
