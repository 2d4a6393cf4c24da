//! A consortium on loopback for swarm tests: key files, site files and a consortium file in
//! a temporary folder, nodes started in-process or as `cellswarm run` processes, and
//! waiting on their events (status changes, log lines) with bounded timeouts.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cellswarm_common::config::Config;
use cellswarm_common::envelope::{AnySigner, PayloadKind, UnverifiedEnvelope};
use cellswarm_common::identity::Identity;
use cellswarm_common::ids::{ModelHash, RoundId};
use cellswarm_common::records::OwnDelta;
use cellswarm_common::weights::{Limits, Weights};
use cellswarm_common::wire::{DeltaHeader, decode_frame};
use cellswarm_node::daemon::{Node, build_trainer};
use cellswarm_node::store::{AuditEntry, BlobKind, DiskStore, Head, Store};
use cellswarm_node::swarm::local::{LocalTrainer, VectorTrainer};
use cellswarm_node::swarm::status::Status;

use crate::util::CELLSWARM;

/// How a test consortium is set up.
#[derive(Debug, Clone)]
pub(crate) struct Setup {
    /// Members.
    pub(crate) nodes: usize,
    /// Size of the `test-vector` model.
    pub(crate) params: u32,
    /// `aggregation.strategy`.
    pub(crate) strategy: &'static str,
    /// Extra lines in `[aggregation]`.
    pub(crate) aggregation: &'static str,
    /// Quorum.
    pub(crate) min_peers: u32,
    /// `rounds.collect_timeout`.
    pub(crate) collect: &'static str,
    /// `rounds.merge_timeout`.
    pub(crate) merge: &'static str,
    /// `rounds.max_rounds`.
    pub(crate) rounds: u64,
    /// `testing.training_delay` of every node.
    pub(crate) training_delay: &'static str,
    /// `testing.merge_delay` of every node.
    pub(crate) merge_delay: &'static str,
    /// Extra lines at the end of every site file.
    pub(crate) site: &'static str,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            nodes: 3,
            params: 1000,
            strategy: "fedavg",
            aggregation: "",
            min_peers: 2,
            collect: "20s",
            merge: "5s",
            rounds: 5,
            training_delay: "0ms",
            merge_delay: "0ms",
            site: "",
        }
    }
}

/// One site's files.
#[derive(Debug)]
pub(crate) struct Site {
    /// The site file.
    pub(crate) node_file: PathBuf,
    /// The store folder.
    pub(crate) store: PathBuf,
    /// Its key.
    pub(crate) seed: [u8; 32],
}

impl Site {
    /// The site's identity.
    pub(crate) fn identity(&self) -> Identity {
        Identity::from_seed(self.seed).expect("a valid seed")
    }

    /// The loaded configuration.
    pub(crate) fn config(&self) -> Config {
        Config::load(&self.node_file).expect("the test configuration is valid")
    }

    /// The store's head and audit log, read after the node stopped.
    pub(crate) fn stored(&self) -> (Option<Head>, Vec<AuditEntry>) {
        let store = DiskStore::open(&self.store, 1 << 20).expect("the store opens");
        let head = store.head().expect("the head reads");
        let mut audit = Vec::new();
        for r in 1..=head.map_or(0, |h| h.round.0) {
            audit.extend(store.audit(RoundId(r)).expect("the audit log reads"));
        }
        (head, audit)
    }
}

impl Site {
    /// The head round and model in the store, read after the node stopped.
    pub(crate) fn head_model(&self) -> (RoundId, Weights) {
        let store = DiskStore::open(&self.store, 1 << 20).expect("the store opens");
        let head = store.head().expect("head").expect("a head");
        let bytes = store
            .blob(BlobKind::Model, head.model.as_bytes())
            .expect("blob")
            .expect("the head model");
        let limits = Limits {
            max_tensors: 16,
            max_params: 1 << 24,
        };
        let model = Weights::from_bytes(&bytes, &limits).expect("a model");
        (head.round, model)
    }

    /// The node's own delta of `round` as it stored (and sent) it: the own-delta record,
    /// the frame header and the encoded body, after the node stopped.
    pub(crate) fn own_delta(&self, round: u64) -> (OwnDelta, DeltaHeader, Vec<u8>) {
        let store = DiskStore::open(&self.store, 1 << 20).expect("the store opens");
        let record = store
            .own_delta(RoundId(round))
            .expect("own-delta records")
            .expect("an own-delta record");
        let hash = record.delta;
        let env = store
            .blob(BlobKind::Delta, hash.as_bytes())
            .expect("blob read")
            .expect("the delta is stored");
        let v = UnverifiedEnvelope::parse(env, 1 << 30)
            .and_then(|u| u.verify(PayloadKind::Delta, &AnySigner))
            .expect("a valid signed delta");
        let (header, body): (DeltaHeader, &[u8]) = decode_frame(v.payload()).expect("a frame");
        (record, header, body.to_vec())
    }
}

/// A multi-threaded tokio runtime for in-process nodes.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A consortium's files in a temporary folder.
#[derive(Debug)]
pub(crate) struct Consortium {
    /// Keeps the folder alive.
    pub(crate) _dir: tempfile::TempDir,
    /// The members.
    pub(crate) sites: Vec<Site>,
    /// The setup.
    pub(crate) setup: Setup,
    /// The genesis model's hash.
    pub(crate) genesis: ModelHash,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Consortium {
    /// Writes key files, site files and the consortium file for `setup`.
    pub(crate) fn new(setup: Setup) -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let genesis = VectorTrainer::new(setup.params as usize, 0, Duration::ZERO)
            .genesis(0)
            .hash();
        let ports: Vec<u16> = (0..setup.nodes).map(|_| free_port()).collect();
        let mut consortium = format!(
            "name = \"swarm-test\"\ngenesis = \"{genesis}\"\n\n[model]\narchitecture = \"test-vector\"\nparams = {}\n\n\
             [rounds]\nmin_peers = {}\ncollect_timeout = \"{}\"\nmerge_timeout = \"{}\"\nmax_rounds = {}\n\n\
             [aggregation]\nstrategy = \"{}\"\nmax_update_norm = 1e12\n{}\n",
            setup.params,
            setup.min_peers,
            setup.collect,
            setup.merge,
            setup.rounds,
            setup.strategy,
            setup.aggregation
        );
        let mut sites = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let seed = [i as u8 + 1; 32];
            let id = Identity::from_seed(seed).expect("a valid seed");
            let site = dir.path().join(format!("site-{i}"));
            std::fs::create_dir_all(&site).expect("a site folder");
            id.write_key_file(&site.join("identity.key"))
                .expect("the key file is written");
            write!(
                consortium,
                "\n[[members]]\nname = \"site-{i}\"\npeer_id = \"{}\"\naddresses = [\"/ip4/127.0.0.1/tcp/{port}\"]\n",
                id.peer_id()
            )
            .expect("writing to a string");
            let node_file = site.join("site.toml");
            std::fs::write(
                &node_file,
                format!(
                    "consortium = \"../consortium.toml\"\n\n[identity]\nkey_file = \"identity.key\"\n\n\
                     [net]\nlisten = [\"/ip4/127.0.0.1/tcp/{port}\"]\nrequest_timeout = \"10s\"\n\n\
                     [training]\nseed = {}\n\n[store]\npath = \"store\"\n\n[status]\nenabled = false\n\n\
                     [testing]\ntraining_delay = \"{}\"\nmerge_delay = \"{}\"\n{}\n",
                    i + 1,
                    setup.training_delay,
                    setup.merge_delay,
                    setup.site
                ),
            )
            .expect("the site file is written");
            sites.push(Site {
                node_file,
                store: site.join("store"),
                seed,
            });
        }
        std::fs::write(dir.path().join("consortium.toml"), consortium)
            .expect("the consortium file is written");
        Self {
            _dir: dir,
            sites,
            setup,
            genesis,
        }
    }

    /// Starts member `i` in this process with its configured trainer, or `trainer`.
    pub(crate) async fn start(&self, i: usize, trainer: Option<Box<dyn LocalTrainer>>) -> Node {
        let config = self.sites[i].config();
        let trainer = trainer.unwrap_or_else(|| build_trainer(&config).expect("a trainer"));
        Node::start(config, self.sites[i].identity(), trainer)
            .await
            .expect("the node starts")
    }

    /// Starts every member in this process with its configured trainer.
    pub(crate) async fn start_all(&self) -> Vec<Node> {
        let mut nodes = Vec::new();
        for i in 0..self.sites.len() {
            nodes.push(self.start(i, None).await);
        }
        nodes
    }

    /// The consortium file.
    pub(crate) fn file(&self) -> PathBuf {
        self._dir.path().join("consortium.toml")
    }

    /// Adds `lines` at the top of member `i`'s `[net]` section.
    pub(crate) fn set_net(&self, i: usize, lines: &str) {
        let file = &self.sites[i].node_file;
        let text = std::fs::read_to_string(file).expect("the site file reads");
        std::fs::write(
            file,
            text.replacen("[net]\n", &format!("[net]\n{lines}\n"), 1),
        )
        .expect("the site file is written");
    }

    /// Appends `lines` to member `i`'s site file (its `[testing]` section comes last).
    pub(crate) fn append_site(&self, i: usize, lines: &str) {
        let file = &self.sites[i].node_file;
        let text = std::fs::read_to_string(file).expect("the site file reads");
        std::fs::write(file, format!("{text}{lines}")).expect("the site file is written");
    }

    /// Starts member `i` as a `cellswarm run` process logging JSON lines to `events`.
    pub(crate) fn spawn(&self, i: usize, events: &mpsc::Sender<LogEvent>) -> Child {
        self.spawn_in(i, events, &[])
    }

    /// Like [`Self::spawn`], run through `wrapper` (e.g. `ip netns exec NS`).
    pub(crate) fn spawn_in(
        &self,
        i: usize,
        events: &mpsc::Sender<LogEvent>,
        wrapper: &[&str],
    ) -> Child {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(CELLSWARM);
                c
            }
            None => Command::new(CELLSWARM),
        };
        cmd.args(["--log-format", "json", "run", "--config"])
            .arg(&self.sites[i].node_file)
            .env(
                "RUST_LOG",
                std::env::var("CELLSWARM_TEST_LOG").unwrap_or_else(|_| "info,libp2p=warn".into()),
            );
        spawn_logged(cmd, i, events)
    }
}

/// Starts `cmd` with stderr piped into `events` as log events of `node`.
pub(crate) fn spawn_logged(
    mut cmd: Command,
    node: usize,
    events: &mpsc::Sender<LogEvent>,
) -> Child {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the cellswarm test binary starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let tx = events.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let event = LogEvent::parse(node, &line);
            if tx.send(event).is_err() {
                return;
            }
        }
        let _ = tx.send(LogEvent {
            node,
            message: EXITED.into(),
            fields: serde_json::Value::Null,
            line: String::new(),
        });
    });
    child
}

/// The message of the event sent after a node process's last log line.
pub(crate) const EXITED: &str = "<process exited>";

/// One log line of a node process.
#[derive(Debug, Clone)]
pub(crate) struct LogEvent {
    /// Which node.
    pub(crate) node: usize,
    /// The message.
    pub(crate) message: String,
    /// Its fields.
    pub(crate) fields: serde_json::Value,
    /// The raw line (for failure reports).
    pub(crate) line: String,
}

impl LogEvent {
    fn parse(node: usize, line: &str) -> Self {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or(serde_json::Value::Null);
        let fields = v.get("fields").cloned().unwrap_or(serde_json::Value::Null);
        Self {
            node,
            message: fields
                .get("message")
                .and_then(|m| m.as_str())
                .unwrap_or_default()
                .to_owned(),
            fields,
            line: line.to_owned(),
        }
    }

    /// A field as a string (numbers and strings).
    pub(crate) fn field(&self, name: &str) -> Option<String> {
        match self.fields.get(name)? {
            serde_json::Value::String(s) => Some(s.clone()),
            v => Some(v.to_string()),
        }
    }

    /// The `round` field as a number.
    pub(crate) fn round(&self) -> Option<u64> {
        self.field("round")?.parse().ok()
    }
}

/// Collects log events and waits for the ones a test needs.
#[derive(Debug)]
pub(crate) struct Logs {
    rx: mpsc::Receiver<LogEvent>,
    /// Everything seen so far.
    pub(crate) seen: Vec<LogEvent>,
}

impl Logs {
    /// A channel to hand to [`Consortium::spawn`], and the collector.
    pub(crate) fn new() -> (mpsc::Sender<LogEvent>, Self) {
        let (tx, rx) = mpsc::channel();
        (
            tx,
            Self {
                rx,
                seen: Vec::new(),
            },
        )
    }

    /// Waits for a new event (not one seen before) satisfying `pred`, for at most
    /// `timeout`; `None` on timeout.
    pub(crate) fn next_matching(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&LogEvent) -> bool,
    ) -> Option<LogEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = self.rx.recv_timeout(left).ok()?;
            self.seen.push(e.clone());
            if pred(&e) {
                return Some(e);
            }
        }
    }

    /// The last 60 swarm log lines seen, newest first (for failure reports).
    fn tail(&self) -> String {
        let lines: Vec<&str> = self
            .seen
            .iter()
            .rev()
            .filter(|e| e.line.contains("cellswarm_node::swarm"))
            .take(60)
            .map(|e| e.line.as_str())
            .collect();
        lines.join("\n")
    }

    /// Like [`Self::next_matching`], but panics on timeout with `what`.
    pub(crate) fn wait_for_new(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl FnMut(&LogEvent) -> bool,
    ) -> LogEvent {
        if let Some(e) = self.next_matching(timeout, pred) {
            return e;
        }
        panic!(
            "timed out after {timeout:?} waiting for {what}; last lines (newest first):\n{}",
            self.tail()
        );
    }

    /// Waits until an event satisfying `pred` arrives (or was already seen since
    /// `from`), for at most `timeout`.
    ///
    /// # Panics
    /// On timeout, with the recent log lines.
    pub(crate) fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&LogEvent) -> bool,
    ) -> LogEvent {
        if let Some(e) = self.seen.iter().find(|e| pred(e)) {
            return e.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(e) => {
                    self.seen.push(e.clone());
                    if pred(&e) {
                        return e;
                    }
                }
                Err(_) => {
                    panic!(
                        "timed out after {timeout:?} waiting for {what}; last lines (newest first):\n{}",
                        self.tail()
                    );
                }
            }
        }
    }
}

/// Waits until the status satisfies `pred`, for at most `timeout`.
///
/// # Panics
/// On timeout, with the last status.
pub(crate) async fn wait_status(
    node: &Node,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Status) -> bool,
) -> Status {
    let mut rx = node.status();
    let found = tokio::time::timeout(timeout, rx.wait_for(|s| pred(s))).await;
    match found {
        Ok(Ok(s)) => s.clone(),
        _ => panic!(
            "timed out after {timeout:?} waiting for {what}; status: {:?}",
            *node.status().borrow()
        ),
    }
}

/// Waits until `node` finished `rounds` rounds and returns its model hash.
pub(crate) async fn wait_done(node: &Node, rounds: u64, timeout: Duration) -> ModelHash {
    let s = wait_status(node, "the last round", timeout, |s| {
        s.head_round.0 >= rounds && s.stopped
    })
    .await;
    s.model.expect("a finished node has a model")
}

/// Waits until every node finished `rounds` rounds; asserts they hold the same model and
/// returns its hash.
pub(crate) async fn wait_all_agree(nodes: &[Node], rounds: u64, timeout: Duration) -> ModelHash {
    let mut hashes = Vec::new();
    for n in nodes {
        hashes.push(wait_done(n, rounds, timeout).await);
    }
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
    hashes[0]
}

/// Stops in-process nodes and waits for each to stop cleanly.
pub(crate) async fn stop_all(nodes: Vec<Node>) {
    for n in &nodes {
        n.shutdown();
    }
    for n in nodes {
        n.wait().await.expect("the node stops cleanly");
    }
}

/// Stops a child with SIGTERM and returns whether it exited 0 within `timeout`.
pub(crate) fn terminate(child: &mut Child, timeout: Duration) -> bool {
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.success();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        // Polling a child's exit has no event to wait on without extra machinery; the
        // loop is bounded by `timeout`.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A member with no engine, only a network handle, for tests that play a lying member:
/// its swarm started as its site file says, its event loop running until `cancel`, and
/// every other member dialled.
pub(crate) async fn raw_member(
    config: &Config,
    id: &Identity,
    cancel: tokio_util::sync::CancellationToken,
) -> (
    cellswarm_node::swarm::network::NetClient,
    tokio::sync::mpsc::Receiver<cellswarm_node::swarm::network::NetEvent>,
    tokio::task::JoinHandle<()>,
) {
    use cellswarm_node::swarm::network::{self, NetSettings};
    let (net, events, event_loop) = network::start(id.libp2p_keypair(), &NetSettings::of(config))
        .expect("the member's network starts");
    let el = tokio::spawn(event_loop.run(cancel));
    for m in &config.consortium.members {
        if m.peer_id != id.peer_id() {
            for a in &m.addresses {
                net.dial(a.clone()).await;
            }
        }
    }
    (net, events, el)
}
