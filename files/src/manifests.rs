//! Listing manifests of file sets and dumps: one scan for both kinds, strict for expire's block
//! sweep (which must know every reference) and sound for listings and restores (which a planted
//! or damaged manifest must not stop).

use std::collections::BTreeMap;
use std::future::Future;

use pitr_archive::{Repository, RepositoryError};

use crate::FilesError;

/// A kind of manifest kept as `files/<kind>/<set>/<id>.manifest`.
pub(crate) trait SetManifest: Sized + Send {
    /// How listings order them (oldest first).
    type Order: Ord + Send;
    /// Where the manifests of `set` (or of every set, with `None`) are listed.
    fn prefix(set: Option<&str>) -> String;
    /// The set and id a name gives, if it is a manifest's name.
    fn parse_name(name: &str) -> Option<(&str, &str)>;
    /// Opens and checks one.
    fn load(repo: &Repository, set: &str, id: &str) -> impl Future<Output = Result<Self, FilesError>> + Send;
    /// Its place in a listing.
    fn order(&self) -> Self::Order;
}

/// Every manifest of `set` (or of every set), oldest first; any that cannot be read is the error.
pub(crate) async fn list_strict<M: SetManifest>(repo: &Repository, set: Option<&str>) -> Result<Vec<M>, FilesError> {
    let (sound, damaged) = scan::<M>(repo, set).await?;
    match damaged.into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(sound),
    }
}

/// Every manifest of `set` (or of every set) that opens, oldest first, and the names of those
/// that do not, with why. Storage errors stay errors: they say nothing about the objects.
pub(crate) async fn list_sound<M: SetManifest>(
    repo: &Repository,
    set: Option<&str>,
) -> Result<(Vec<M>, Vec<(String, String)>), FilesError> {
    let (sound, damaged) = scan::<M>(repo, set).await?;
    Ok((sound, damaged.into_iter().map(|(name, e)| (name, e.to_string())).collect()))
}

async fn scan<M: SetManifest>(
    repo: &Repository,
    set: Option<&str>,
) -> Result<(Vec<M>, Vec<(String, FilesError)>), FilesError> {
    let mut out = BTreeMap::new();
    let mut damaged = Vec::new();
    for obj in repo.list(&M::prefix(set)).await? {
        let Some((set, id)) = M::parse_name(&obj.name) else { continue };
        match M::load(repo, set, id).await {
            Ok(m) => {
                out.insert(m.order(), m);
            }
            // Removed since the listing (an expire): not a manifest any more.
            Err(FilesError::Repository(RepositoryError::Store(e))) if e.is_not_found() => {}
            Err(FilesError::Repository(e)) if e.is_bad_object() => damaged.push((obj.name.clone(), e.into())),
            Err(e) => return Err(e),
        }
    }
    Ok((out.into_values().collect(), damaged))
}
