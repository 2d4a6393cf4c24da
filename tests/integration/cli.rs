use std::fs;

use crate::util::{cellswarm, ok_stdout};
use cellswarm_common::config::Config;
use cellswarm_common::identity::Identity;

#[test]
fn help_lists_the_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let out = ok_stdout(&cellswarm(tmp.path(), &["--help"]));
    for cmd in ["keygen", "init"] {
        assert!(out.contains(cmd), "--help should list {cmd}:\n{out}");
    }
}

#[test]
fn keygen_prints_the_peer_id_of_the_key_it_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let out = ok_stdout(&cellswarm(
        tmp.path(),
        &["keygen", "--out", "keys/node.key"],
    ));
    let id = Identity::load_key_file(&tmp.path().join("keys/node.key")).unwrap();
    assert_eq!(out.trim(), id.peer_id().to_string());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(tmp.path().join("keys/node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // A second keygen to the same path fails and leaves the key alone.
    let again = cellswarm(tmp.path(), &["keygen", "--out", "keys/node.key"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let still = Identity::load_key_file(&tmp.path().join("keys/node.key")).unwrap();
    assert_eq!(still.peer_id(), id.peer_id());
}

#[test]
fn init_makes_a_site_that_loads_and_refuses_to_run_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let out = ok_stdout(&cellswarm(
        tmp.path(),
        &["init", "site-a", "--name", "site-a"],
    ));
    let site = tmp.path().join("site-a");
    let config = Config::load(&site.join("cellswarm.toml")).unwrap();
    let id = Identity::load_key_file(&config.node.identity.key_file).unwrap();
    assert!(
        out.contains(&id.peer_id().to_string()),
        "init prints the PeerId:\n{out}"
    );
    assert_eq!(config.own_member(&id.peer_id()).unwrap().name, "site-a");
    assert!(site.join("data").is_dir());

    let key = fs::read(site.join("identity.key")).unwrap();
    let again = cellswarm(tmp.path(), &["init", "site-a", "--name", "site-a"]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(fs::read(site.join("identity.key")).unwrap(), key);
}

#[test]
fn a_world_readable_key_is_refused_with_the_fix() {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let _ = ok_stdout(&cellswarm(tmp.path(), &["init", "s", "--name", "s"]));
        let key = tmp.path().join("s/identity.key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load_key_file(&key).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}

#[test]
fn bench_merge_ends_with_the_machine_readable_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = ok_stdout(&cellswarm(
        tmp.path(),
        &[
            "bench",
            "merge",
            "--updates",
            "3",
            "--params",
            "64K",
            "--reps",
            "2",
            "--strategy",
            "median",
        ],
    ));
    let last = out.lines().last().unwrap_or_default();
    let fields: Vec<(&str, f64)> = last
        .split(' ')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k, v.parse().unwrap())
        })
        .collect();
    let keys: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, ["merge_gbps", "copy_gbps", "traffic_ratio"], "{last}");
    assert!(fields.iter().all(|(_, v)| *v > 0.0), "{last}");
    let bad = cellswarm(tmp.path(), &["bench", "merge", "--strategy", "fedmagic"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("trimmed-mean"));
}
