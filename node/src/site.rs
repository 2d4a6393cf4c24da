//! Creating a site folder: `cellswarm init DIR --name NAME`.
//!
//! A site folder holds everything one institution's node needs:
//!
//! ```text
//! DIR/identity.key      the node's Ed25519 seed, mode 0600
//! DIR/cellswarm.toml    the site file (commented template)
//! DIR/consortium.toml   a starter consortium file naming only this site
//! DIR/data/             where the site's movies go
//! ```
//!
//! Nothing is written unless every target is free: re-running `init` on an existing
//! site refuses, and the key is never overwritten.

use std::fs;
use std::path::{Path, PathBuf};

use cellswarm_common::identity::{Identity, IdentityError};
use libp2p::PeerId;

/// Name of the key file inside a site folder.
pub const KEY_FILE: &str = "identity.key";
/// Name of the site file inside a site folder.
pub const SITE_FILE: &str = "cellswarm.toml";
/// Name of the consortium file inside a site folder.
pub const CONSORTIUM_FILE: &str = "consortium.toml";
/// Name of the data folder inside a site folder.
pub const DATA_DIR: &str = "data";

const SITE_TEMPLATE: &str = include_str!("site/site.toml");
const CONSORTIUM_TEMPLATE: &str = include_str!("site/consortium.toml");

/// What went wrong creating a site.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// The name has characters that are not allowed.
    #[error("site name {0:?} must be 1-64 characters of letters, digits, '.', '_' or '-'")]
    BadName(String),
    /// A file of the site already exists.
    #[error(
        "{0} already exists: this folder already holds a site; refusing to overwrite it \
         (a site's key is its identity; move the folder away to start afresh)"
    )]
    Exists(PathBuf),
    /// Creating the key failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Writing a file or folder failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The site that [`init`] created.
#[derive(Debug, Clone)]
pub struct CreatedSite {
    /// The site's display name.
    pub name: String,
    /// The site's PeerId, to send to the other members.
    pub peer_id: PeerId,
    /// The site folder.
    pub dir: PathBuf,
}

impl CreatedSite {
    /// A summary for the operator, ending with the entry to send to the other members.
    #[must_use]
    pub fn summary(&self) -> String {
        let d = self.dir.display();
        format!(
            "Created site \"{name}\" in {d}\n\
             \x20 key         {d}/{KEY_FILE} (mode 0600; back it up, never share it)\n\
             \x20 config      {d}/{SITE_FILE}\n\
             \x20 consortium  {d}/{CONSORTIUM_FILE} (starter; replace with the consortium's shared file)\n\
             \x20 data        {d}/{DATA_DIR}/\n\
             PeerId: {peer}\n\
             Send this entry to the member who keeps the consortium file:\n\
             \n\
             [[members]]\n\
             name = \"{name}\"\n\
             peer_id = \"{peer}\"\n",
            name = self.name,
            peer = self.peer_id,
        )
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn fill(template: &str, name: &str, peer: &PeerId, port: u16) -> String {
    template
        .replace("{{NAME}}", name)
        .replace("{{PEER_ID}}", &peer.to_string())
        .replace("{{PORT}}", &port.to_string())
}

fn write_new(path: &Path, text: &str) -> Result<(), SiteError> {
    use std::io::Write;
    let io = |source| SiteError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                SiteError::Exists(path.to_owned())
            } else {
                io(e)
            }
        })?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Creates a site folder for `name` in `dir`, listening on TCP `port`.
///
/// # Errors
/// [`SiteError::Exists`] if any of the site's files is already there (nothing is
/// written then), a bad name, or I/O errors.
pub fn init(dir: &Path, name: &str, port: u16) -> Result<CreatedSite, SiteError> {
    if !valid_name(name) {
        return Err(SiteError::BadName(name.to_owned()));
    }
    let key = dir.join(KEY_FILE);
    let site = dir.join(SITE_FILE);
    let consortium = dir.join(CONSORTIUM_FILE);
    for p in [&key, &site, &consortium] {
        if p.exists() {
            return Err(SiteError::Exists(p.clone()));
        }
    }
    fs::create_dir_all(dir.join(DATA_DIR)).map_err(|source| SiteError::Io {
        path: dir.join(DATA_DIR),
        source,
    })?;
    let id = Identity::create_key_file(&key).map_err(|e| match e {
        IdentityError::Exists(p) => SiteError::Exists(p),
        other => other.into(),
    })?;
    let peer = id.peer_id();
    write_new(&site, &fill(SITE_TEMPLATE, name, &peer, port))?;
    write_new(&consortium, &fill(CONSORTIUM_TEMPLATE, name, &peer, port))?;
    Ok(CreatedSite {
        name: name.to_owned(),
        peer_id: peer,
        dir: dir.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellswarm_common::config::Config;

    #[test]
    fn init_creates_a_site_whose_config_loads() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("site-a");
        let created = init(&dir, "site-a", 7171).unwrap();
        assert!(dir.join(DATA_DIR).is_dir());
        let config = Config::load(&dir.join(SITE_FILE)).unwrap();
        let me = config.own_member(&created.peer_id).unwrap();
        assert_eq!(me.name, "site-a");
        assert_eq!(
            config.node.net.listen[0].to_string(),
            "/ip4/0.0.0.0/tcp/7171"
        );
        assert_eq!(config.node.identity.key_file, dir.join(KEY_FILE));
        let id = Identity::load_key_file(&config.node.identity.key_file).unwrap();
        assert_eq!(id.peer_id(), created.peer_id);
        assert!(created.summary().contains(&created.peer_id.to_string()));
    }

    #[test]
    fn init_refuses_an_existing_site_and_keeps_its_key() {
        let tmp = tempfile::tempdir().unwrap();
        let first = init(tmp.path(), "lab", 7070).unwrap();
        let key_before = fs::read(tmp.path().join(KEY_FILE)).unwrap();
        let err = init(tmp.path(), "lab", 7070).unwrap_err();
        assert!(matches!(err, SiteError::Exists(_)), "{err}");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(fs::read(tmp.path().join(KEY_FILE)).unwrap(), key_before);
        // Even with only the key left, init refuses rather than writing a new one.
        fs::remove_file(tmp.path().join(SITE_FILE)).unwrap();
        fs::remove_file(tmp.path().join(CONSORTIUM_FILE)).unwrap();
        assert!(matches!(
            init(tmp.path(), "lab", 7070),
            Err(SiteError::Exists(_))
        ));
        let id = Identity::load_key_file(&tmp.path().join(KEY_FILE)).unwrap();
        assert_eq!(id.peer_id(), first.peer_id);
    }

    #[test]
    fn init_refuses_bad_names() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in ["", "a b", "x\"y", "ünï", &"n".repeat(65)] {
            assert!(
                matches!(init(tmp.path(), bad, 1), Err(SiteError::BadName(_))),
                "{bad:?}"
            );
        }
        assert!(!tmp.path().join(KEY_FILE).exists());
    }
}
