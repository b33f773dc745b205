//! Named profiles from the AWS shared files (`~/.aws/credentials`, `~/.aws/config`): the step of
//! the standard credential chain that `object_store` leaves out (it reads the environment, web
//! identity/IRSA, container and instance credentials, but no profile files).
//!
//! Only static keys are read (`aws_access_key_id`, `aws_secret_access_key`,
//! `aws_session_token`) and the profile's `region`. Profiles that assume a role or use SSO are
//! refused by name rather than silently skipped: a user who picked one would otherwise get
//! another identity from a later step of the chain.

use std::path::PathBuf;

use ini::Ini;

/// Static keys (and a region) from a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileKeys {
    /// The profile's name (as in `AWS_PROFILE`; `default` when unset).
    pub profile: String,
    /// `aws_access_key_id`.
    pub access_key_id: String,
    /// `aws_secret_access_key`.
    pub secret_access_key: String,
    /// `aws_session_token`, for temporary credentials.
    pub session_token: Option<String>,
    /// The profile's `region`, from the config file only (as the AWS SDKs read it); used when
    /// neither the environment nor `[repository] region` sets one.
    pub region: Option<String>,
}

/// Keys of a profile that has no static keys but names another way to get them.
const INDIRECT: [&str; 4] = ["role_arn", "sso_session", "sso_start_url", "credential_process"];

/// The profile `profile` from the texts of the credentials and config files. `Ok(None)`: the
/// profile is in neither file (or has nothing pitr uses).
pub fn parse(credentials: Option<&str>, config: Option<&str>, profile: &str) -> Result<Option<ProfileKeys>, String> {
    let load = |text: Option<&str>, what: &str| -> Result<Option<Ini>, String> {
        text.map(|t| Ini::load_from_str(t).map_err(|e| format!("{what}: {e}"))).transpose()
    };
    let credentials = load(credentials, "AWS credentials file")?;
    let config = load(config, "AWS config file")?;
    // The config file names profiles `[profile NAME]`, except `[default]`.
    let config_section = if profile == "default" { "default".to_string() } else { format!("profile {profile}") };
    let in_credentials = credentials.as_ref().and_then(|i| i.section(Some(profile)));
    let in_config = config.as_ref().and_then(|i| i.section(Some(config_section.as_str())));
    if in_credentials.is_none() && in_config.is_none() {
        return Ok(None);
    }
    let get = |key: &str| {
        in_credentials
            .and_then(|s| s.get(key))
            .or_else(|| in_config.and_then(|s| s.get(key)))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let region = in_config.and_then(|s| s.get("region")).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Some(ProfileKeys {
            profile: profile.to_string(),
            access_key_id,
            secret_access_key,
            session_token: get("aws_session_token"),
            region,
        })),
        (Some(_), None) | (None, Some(_)) => {
            Err(format!("AWS profile {profile:?} has only one of aws_access_key_id and aws_secret_access_key"))
        }
        (None, None) => match INDIRECT.iter().find(|k| get(k).is_some()) {
            Some(k) => Err(format!(
                "AWS profile {profile:?} gets its credentials through `{k}`, which pitr does not support; give it \
                 static keys, or use environment variables or an instance/IRSA role"
            )),
            None => Ok(None),
        },
    }
}

fn home_file(env: &str, default: &str) -> Option<PathBuf> {
    std::env::var_os(env)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(default)))
}

/// The profile of the standard chain: `AWS_PROFILE` (else `default`) from
/// `AWS_SHARED_CREDENTIALS_FILE`/`AWS_CONFIG_FILE` (else `~/.aws/credentials`, `~/.aws/config`).
/// A profile named in `AWS_PROFILE` that neither file holds is an error; a missing `default` is
/// not (the chain goes on).
pub fn from_environment() -> Result<Option<ProfileKeys>, String> {
    let named = std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty());
    let profile = named.clone().unwrap_or_else(|| "default".into());
    let read = |path: Option<PathBuf>| -> Result<Option<String>, String> {
        let Some(path) = path else { return Ok(None) };
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    };
    let credentials = read(home_file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"))?;
    let config = read(home_file("AWS_CONFIG_FILE", ".aws/config"))?;
    match parse(credentials.as_deref(), config.as_deref(), &profile)? {
        Some(keys) => Ok(Some(keys)),
        None if named.is_some() => {
            Err(format!("AWS_PROFILE={profile}: no such profile with keys in the AWS credentials or config file"))
        }
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREDENTIALS: &str = "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = s1\n\n\
                               [backup]\naws_access_key_id=AKIABACKUP\naws_secret_access_key=s2\naws_session_token=tok\n";
    const CONFIG: &str = "[default]\nregion = eu-west-1\n[profile backup]\nregion = us-east-2\n\
                          [profile sso]\nsso_session = corp\n[profile onlyconfig]\naws_access_key_id = A\naws_secret_access_key = B\n";

    #[test]
    fn profiles_from_both_files() {
        let d = parse(Some(CREDENTIALS), Some(CONFIG), "default").unwrap().unwrap();
        assert_eq!((d.access_key_id.as_str(), d.region.as_deref()), ("AKIADEFAULT", Some("eu-west-1")));
        let b = parse(Some(CREDENTIALS), Some(CONFIG), "backup").unwrap().unwrap();
        assert_eq!(b.session_token.as_deref(), Some("tok"));
        assert_eq!(b.region.as_deref(), Some("us-east-2"));
        let c = parse(None, Some(CONFIG), "onlyconfig").unwrap().unwrap();
        assert_eq!(c.secret_access_key, "B");
        assert_eq!(parse(Some(CREDENTIALS), Some(CONFIG), "nobody").unwrap(), None);
        assert_eq!(parse(None, None, "default").unwrap(), None);
    }

    #[test]
    fn unsupported_and_half_profiles_are_named() {
        let e = parse(None, Some(CONFIG), "sso").unwrap_err();
        assert!(e.contains("\"sso\"") && e.contains("sso_session"), "{e}");
        let e = parse(Some("[x]\naws_access_key_id = A\n"), None, "x").unwrap_err();
        assert!(e.contains("only one of"), "{e}");
    }
}
