//! Across real network boundaries on one machine: Linux network namespaces with NATs.
//!
//! ```text
//!                 internet namespace: bridge 10.99.0.1/24, `cellswarm relay` at 10.99.0.1
//!            ┌──────────────────────┼──────────────────────┐
//!   router 0: 10.99.0.10     router 1: 10.99.0.11     router 2: 10.99.0.12
//!   full-cone NAT            port-restricted NAT      symmetric NAT
//!   (MASQUERADE + its UDP    (MASQUERADE)             (MASQUERADE --random-fully)
//!    port forwarded back)
//!            │                      │                      │
//!   site 0: 192.168.1.2      site 1: 192.168.2.2      site 2: 192.168.3.2
//! ```
//!
//! Each router forwards only connections its site opened (and, for the full-cone NAT,
//! datagrams to the one UDP port its site's node uses), so no site can dial another:
//! three real `cellswarm run` processes list no address in the consortium file, reserve
//! a slot on the relay, reach each other through it, and try to punch holes. What the
//! NAT types allow is asserted: the full-cone site and the port-restricted one end
//! up direct; the port-restricted and symmetric ones stay relayed (the full-cone and
//! symmetric pair punches through or not depending on which side dials, and is only
//! reported). Rounds commit with one model hash everywhere, and a counter on every
//! router shows that nothing tried to reach an address outside the namespaces (they
//! have no route out anyway).
//!
//! Needs root, `ip` (iproute2) and `iptables`; skips with the reason where namespaces
//! cannot be made, unless `CELLSWARM_REQUIRE_NETNS=1` (CI), where that is a failure.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cellswarm_common::identity::Identity;

use crate::swarm_util::{Consortium, LogEvent, Logs, Setup, spawn_logged, terminate};
use crate::util::CELLSWARM;

const WAIT: Duration = Duration::from_secs(120);

/// The node's port (TCP and UDP) in every site.
const PORT: u16 = 7070;

/// Runs `line` split at whitespace (the first word is the program); the error says
/// what failed and why.
fn sh(line: &str) -> Result<String, String> {
    let args: Vec<&str> = line.split_whitespace().collect();
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("`{line}`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{line}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The namespaces of one test run, deleted on drop.
struct Topology {
    tag: String,
    made: Vec<String>,
}

impl Topology {
    fn inet(&self) -> String {
        format!("csi{}", self.tag)
    }

    fn router(&self, i: usize) -> String {
        format!("csr{i}{}", self.tag)
    }

    fn site(&self, i: usize) -> String {
        format!("css{i}{}", self.tag)
    }

    fn add_ns(&mut self, name: &str) -> Result<(), String> {
        sh(&format!("ip netns add {name}"))?;
        self.made.push(name.to_owned());
        sh(&format!("ip -n {name} link set lo up"))?;
        Ok(())
    }

    /// Builds the internet, three routers and three sites (see the module docs).
    fn build() -> Result<Self, String> {
        let mut t = Self {
            tag: format!("{:x}", std::process::id() & 0xfffff),
            made: Vec::new(),
        };
        let inet = t.inet();
        t.add_ns(&inet)?;
        sh(&format!("ip -n {inet} link add br0 type bridge"))?;
        sh(&format!("ip -n {inet} addr add 10.99.0.1/24 dev br0"))?;
        sh(&format!("ip -n {inet} link set br0 up"))?;
        for i in 0..3 {
            let (r, s, n) = (t.router(i), t.site(i), i + 1);
            t.add_ns(&r)?;
            t.add_ns(&s)?;
            for line in [
                format!("ip link add wan netns {r} type veth peer name p{i} netns {inet}"),
                format!("ip -n {inet} link set p{i} master br0"),
                format!("ip -n {inet} link set p{i} up"),
                format!("ip -n {r} addr add 10.99.0.{}/24 dev wan", 10 + i),
                format!("ip -n {r} link set wan up"),
                format!("ip link add lan netns {r} type veth peer name eth0 netns {s}"),
                format!("ip -n {r} addr add 192.168.{n}.1/24 dev lan"),
                format!("ip -n {r} link set lan up"),
                format!("ip -n {s} addr add 192.168.{n}.2/24 dev eth0"),
                format!("ip -n {s} link set eth0 up"),
                format!("ip -n {s} route add default via 192.168.{n}.1"),
                format!("ip netns exec {r} sysctl -qw net.ipv4.ip_forward=1"),
            ] {
                sh(&line)?;
            }
            let ipt = |rule: &str| sh(&format!("ip netns exec {r} iptables {rule}"));
            // Symmetric NAT: a new mapping (source port) for every destination.
            let random = if i == 2 { " --random-fully" } else { "" };
            ipt(&format!(
                "-t nat -A POSTROUTING -o wan -j MASQUERADE{random}"
            ))?;
            // Counts anything a site sends to an address outside the namespaces.
            ipt("-t raw -A PREROUTING -i lan ! -d 10.99.0.0/24 -m comment --comment outside")?;
            ipt("-A FORWARD -i lan -o wan -j ACCEPT")?;
            ipt("-A FORWARD -i wan -o lan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")?;
            if i == 0 {
                // Full cone (endpoint-independent filtering) for the node's UDP port: any
                // host may send to the mapping once it exists. Linux has no such NAT mode;
                // forwarding the one port back to the site is how it is emulated.
                ipt(&format!(
                    "-t nat -A PREROUTING -i wan -p udp --dport {PORT} -j DNAT --to-destination 192.168.1.2:{PORT}"
                ))?;
                ipt(&format!(
                    "-A FORWARD -i wan -o lan -p udp -d 192.168.1.2 --dport {PORT} -j ACCEPT"
                ))?;
            }
            ipt("-P FORWARD DROP")?;
            // Unsolicited packets to the router itself are dropped, as home and hospital
            // routers do. Dropped before conntrack confirms them, they leave no entry
            // behind that would make the site's own later mapping of that port collide
            // (and take another port) when both sides of a hole punch send at once.
            ipt("-A INPUT -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")?;
            ipt("-A INPUT -i wan -j DROP")?;
        }
        Ok(t)
    }

    /// Packets a site sent to an address outside the namespaces, per router.
    fn outside_packets(&self) -> Vec<u64> {
        (0..3)
            .map(|i| {
                let r = self.router(i);
                sh(&format!(
                    "ip netns exec {r} iptables -t raw -L PREROUTING -v -n -x"
                ))
                .expect("the counters read")
                .lines()
                .find(|l| l.contains("outside"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .expect("the counting rule is there")
            })
            .collect()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            let _ = sh(&format!("ip netns del {ns}"));
        }
    }
}

/// Processes started in the namespaces: killed (and reaped) on drop, so a failed
/// assertion leaves nothing running. Declared after the [`Topology`], so it drops first.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Why namespaces cannot be made here, if they cannot.
fn unavailable() -> Option<String> {
    if sh("ip -V").is_err() {
        return Some("`ip` (iproute2) is not installed".into());
    }
    if sh("iptables --version").is_err() {
        return Some("`iptables` is not installed".into());
    }
    let probe = format!("csprobe{:x}", std::process::id() & 0xfffff);
    if let Err(e) = sh(&format!("ip netns add {probe}")) {
        return Some(format!(
            "cannot create a network namespace (root needed): {e}"
        ));
    }
    let _ = sh(&format!("ip netns del {probe}"));
    None
}

/// Writes the consortium for the namespaces: no member address, the relay's TCP and
/// QUIC addresses; every node listens on all its addresses at [`PORT`].
fn configure(c: &Consortium, relay: &Identity) {
    let file = c.file();
    let id = relay.peer_id();
    let text = std::fs::read_to_string(&file).expect("the consortium file reads");
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("addresses") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line.starts_with("genesis") {
            out.push_str(&format!(
                "relays = [\"/ip4/10.99.0.1/tcp/7071/p2p/{id}\", \"/ip4/10.99.0.1/udp/7071/quic-v1/p2p/{id}\"]\n"
            ));
        }
    }
    std::fs::write(&file, out).expect("the consortium file is written");
    for site in &c.sites {
        let text = std::fs::read_to_string(&site.node_file).expect("the site file reads");
        let listen = text
            .lines()
            .find(|l| l.starts_with("listen"))
            .expect("a listen line")
            .to_owned();
        let text = text.replace(
            &listen,
            &format!("listen = [\"/ip4/0.0.0.0/tcp/{PORT}\", \"/ip4/0.0.0.0/udp/{PORT}/quic-v1\"]"),
        );
        std::fs::write(&site.node_file, text).expect("the site file is written");
    }
}

#[test]
fn three_sites_behind_nats_commit_rounds_through_a_relay_and_punch_holes_where_nats_allow() {
    if let Some(why) = unavailable() {
        assert!(
            std::env::var_os("CELLSWARM_REQUIRE_NETNS").is_none(),
            "CELLSWARM_REQUIRE_NETNS is set but {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let topo = Topology::build().expect("the namespaces are built");
    let rounds = 4;
    let c = Consortium::new(Setup {
        nodes: 3,
        min_peers: 3,
        rounds,
        params: 100_000,
        collect: "60s",
        merge: "10s",
        ..Setup::default()
    });
    let relay = Identity::from_seed([42; 32]).expect("a seed");
    configure(&c, &relay);
    let relay_key = c.file().with_file_name("relay.key");
    relay.write_key_file(&relay_key).expect("the relay key");

    let (tx, mut logs) = Logs::new();
    let mut children = Children(Vec::new());
    let inet = topo.inet();
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &inet,
        CELLSWARM,
        "--log-format",
        "json",
        "relay",
    ])
    .arg("--consortium")
    .arg(c.file())
    .arg("--key")
    .arg(&relay_key)
    .args([
        "--listen",
        "/ip4/10.99.0.1/tcp/7071",
        "--listen",
        "/ip4/10.99.0.1/udp/7071/quic-v1",
    ])
    .env("RUST_LOG", "info,libp2p=warn");
    children.0.push(spawn_logged(cmd, 3, &tx));
    logs.wait_for_new("the relay listening", WAIT, |e| {
        e.node == 3 && e.message == "listening"
    });
    let sites: Vec<String> = (0..3).map(|i| topo.site(i)).collect();
    for (i, ns) in sites.iter().enumerate() {
        children
            .0
            .push(c.spawn_in(i, &tx, &["ip", "netns", "exec", ns]));
    }
    let peers: Vec<String> = c
        .sites
        .iter()
        .map(|s| s.identity().peer_id().to_string())
        .collect();
    let index = |e: &LogEvent| {
        e.field("peer")
            .and_then(|p| peers.iter().position(|x| *x == p))
    };

    // Every site commits every round, with one model hash.
    let started = Instant::now();
    let mut done: [Option<String>; 3] = Default::default();
    let mut seconds: Vec<f64> = Vec::new();
    while done.iter().any(Option::is_none) {
        let e = logs.wait_for_new("every site's last round", WAIT, |e| {
            e.node < 3 && e.message == "round committed"
        });
        if let Some(s) = e.field("seconds").and_then(|s| s.parse().ok()) {
            seconds.push(s);
        }
        if e.round() == Some(rounds) {
            done[e.node] = e.field("model");
        }
    }
    assert!(done.windows(2).all(|w| w[0] == w[1]), "{done:?}");

    // Hole punching: a pair is direct once either side reports the punch.
    let punched = |logs: &Logs, a: usize, b: usize| {
        logs.seen.iter().any(|e| {
            e.message.starts_with("hole punched")
                && ((e.node == a && index(e) == Some(b)) || (e.node == b && index(e) == Some(a)))
        })
    };
    let failed = |logs: &Logs, a: usize, b: usize| {
        logs.seen.iter().any(|e| {
            e.message.starts_with("hole punching failed")
                && ((e.node == a && index(e) == Some(b)) || (e.node == b && index(e) == Some(a)))
        })
    };
    let deadline = Instant::now() + WAIT;
    while !(punched(&logs, 0, 1) && failed(&logs, 1, 2)) && Instant::now() < deadline {
        let _ = logs.next_matching(deadline.saturating_duration_since(Instant::now()), |e| {
            e.message.starts_with("hole punch")
        });
    }
    let story = || {
        logs.seen
            .iter()
            .filter(|e| {
                e.message.contains("hole")
                    || e.message.contains("reachable")
                    || e.line.contains("libp2p_dcutr")
            })
            .map(|e| format!("site {}: {}", e.node, e.line))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        punched(&logs, 0, 1),
        "full cone and port-restricted NATs: no hole punched:\n{}",
        story()
    );
    assert!(
        !punched(&logs, 1, 2) && failed(&logs, 1, 2),
        "port-restricted and symmetric NATs: the pair should stay relayed"
    );
    eprintln!(
        "{rounds} rounds in {:.1} s; round seconds {seconds:?}; sites 0-2 direct by hole punching: {}, sites 0-1 direct: true, sites 1-2 relayed",
        started.elapsed().as_secs_f64(),
        punched(&logs, 0, 2)
    );
    assert_eq!(
        topo.outside_packets(),
        vec![0, 0, 0],
        "a site tried to reach outside"
    );
    for (i, child) in children.0.iter_mut().enumerate() {
        assert!(
            terminate(child, Duration::from_secs(30)),
            "process {i} did not exit 0 on SIGTERM"
        );
    }
}
