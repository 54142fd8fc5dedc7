//! Agent restarts across nodes (run as root). With an agent SIGKILLed, its pods' traffic to other
//! nodes takes the standby kernel path (the agent's Flannel-compatible VXLAN device
//! `sluice-vxlan`), which carries nothing while the agent runs; the restarted agent takes the
//! traffic back, and what it inherits of the killed one's pinned state does not pile up.
//!
//! The figures (the longest ping silence around the kill and around the restart, each direction,
//! and iperf3's rate per phase) are printed before anything is asserted, so a run against an older
//! agent (`SLUICE_AGENT_BIN`) reports them too.

use std::collections::BTreeSet;
use std::io::{Read, Seek};
use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use sluice_e2e::{AgentOptions, Cluster, HarnessError, NodeKind, Result, in_ns, require_root};

fn check(r: Result<()>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

fn setup(e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Setup(e.to_string())
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `ping -D` every `interval` for `seconds` from namespace `ns`, in the background. Its output
/// goes to a file, not a pipe: a pipe nobody reads until the end fills at 64 KiB (about 800
/// replies) and blocks ping, which then sends nothing more and looks like a silence.
fn ping(ns: &str, to: Ipv4Addr, interval: &str, seconds: u32) -> Result<PingRun> {
    let out = tempfile::tempfile().map_err(setup)?;
    let child = in_ns(
        ns,
        &[
            "ping",
            "-n",
            "-D",
            "-i",
            interval,
            "-W",
            "1",
            "-w",
            &seconds.to_string(),
            &to.to_string(),
        ],
    )
    .stdout(out.try_clone().map_err(setup)?)
    .stderr(Stdio::piped())
    .spawn()
    .map_err(|e| setup(format!("ping: {e}")))?;
    Ok(PingRun { child, out })
}

/// A running ping and the file its output goes to.
struct PingRun {
    child: Child,
    out: std::fs::File,
}

/// What one ping run saw: replies as (sequence, arrival time in Unix seconds).
struct Pings {
    replies: Vec<(u64, f64)>,
    last_seq: u64,
    /// When the run was to end (Unix seconds): a silence up to then counts as one gap.
    end: f64,
    /// What ping said on stderr (e.g. "Network is unreachable" before it gave up).
    errors: String,
}

impl Pings {
    fn collect(run: PingRun, end: f64) -> Result<Self> {
        let PingRun { child, mut out } = run;
        let err = child.wait_with_output().map_err(setup)?;
        let mut text = String::new();
        out.rewind().map_err(setup)?;
        out.read_to_string(&mut text).map_err(setup)?;
        let mut replies = Vec::new();
        for line in text.lines() {
            let (Some(t), Some(seq)) = (
                line.strip_prefix('[')
                    .and_then(|l| l.split(']').next())
                    .and_then(|t| t.parse::<f64>().ok()),
                line.split("icmp_seq=")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|s| s.parse::<u64>().ok()),
            ) else {
                continue;
            };
            replies.push((seq, t));
        }
        replies.sort_by_key(|r| r.0);
        replies.dedup_by_key(|r| r.0);
        let last_seq = text
            .lines()
            .find_map(|l| l.split(" packets transmitted").next()?.parse().ok())
            .unwrap_or(0);
        // Errors on stderr, and ICMP errors on stdout ("From ... icmp_seq=N Destination Net
        // Unreachable"), each said once.
        let mut errors: Vec<String> = String::from_utf8_lossy(&err.stderr)
            .lines()
            .chain(text.lines().filter(|l| l.contains("From ")))
            .map(|l| {
                let l = l.split_once("] ").map_or(l, |(_, rest)| rest);
                l.split_whitespace()
                    .filter(|w| !w.starts_with("icmp_seq="))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        errors.sort();
        errors.dedup();
        Ok(Self {
            replies,
            last_seq,
            end,
            errors: errors.join("; "),
        })
    }

    /// The longest silence (ms from a reply to the next one, or to the end of the run when none
    /// came: ping gave up or nothing answered again) that started within `[from, to)` (Unix
    /// seconds), with the echoes lost in it.
    fn gap(&self, from: f64, to: f64) -> (f64, u64) {
        let mut worst = (0.0, 0);
        let next = self
            .replies
            .iter()
            .skip(1)
            .copied()
            .chain(std::iter::once((self.last_seq + 1, self.end)));
        for ((s1, t1), (s2, t2)) in self.replies.iter().copied().zip(next) {
            if t1 >= from - 0.05 && t1 < to && (s2 > s1 + 1 || t2 == self.end) {
                let ms = (t2 - t1) * 1000.0;
                if ms > worst.0 {
                    worst = (ms, s2.saturating_sub(s1 + 1));
                }
            }
        }
        worst
    }

    fn lost(&self) -> u64 {
        self.last_seq.saturating_sub(self.replies.len() as u64)
    }
}

/// `sysfs` statistics of `ifname` in namespace `ns`: (tx_packets, rx_packets).
fn packets(ns: &str, ifname: &str) -> Result<(u64, u64)> {
    let read = |what: &str| -> Result<u64> {
        let out = sluice_e2e::sh(
            ns,
            &format!("cat /sys/class/net/{ifname}/statistics/{what}"),
        )?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(setup)
    };
    Ok((read("tx_packets")?, read("rx_packets")?))
}

fn json(ns: &str, argv: &[&str]) -> Result<serde_json::Value> {
    let out = sluice_e2e::run(&mut in_ns(ns, argv))?;
    serde_json::from_slice(&out.stdout).map_err(|e| setup(format!("{argv:?}: {e}")))
}

/// The standby device of node `i` is what DESIGN's Conventions make `flannel.1`, with a route,
/// a neighbor and an FDB entry for every other node.
fn check_standby_device(c: &Cluster, i: usize) -> Result<()> {
    let n = &c.nodes[i];
    let link = json(
        &n.ns,
        &["ip", "-d", "-j", "link", "show", "dev", "sluice-vxlan"],
    )?;
    let l = &link[0];
    let data = &l["linkinfo"]["info_data"];
    println!(
        "node {i} sluice-vxlan: mtu {} address {} {}",
        l["mtu"], l["address"], l["linkinfo"]
    );
    assert_eq!(l["linkinfo"]["info_kind"], "vxlan", "{l}");
    assert_eq!(data["id"], 1, "{l}");
    assert_eq!(data["port"], 8472, "{l}");
    assert_eq!(data["learning"], false, "{l}");
    assert_eq!(data["local"], n.underlay_ip.to_string(), "{l}");
    assert_eq!(data["link"], "eth0", "{l}");
    assert_eq!(l["mtu"], sluice_e2e::underlay_mtu() - 50, "{l}");
    assert_eq!(l["address"], n.vtep_mac.to_string(), "{l}");
    let routes = json(&n.ns, &["ip", "-j", "route", "show", "dev", "sluice-vxlan"])?;
    let neighs = json(&n.ns, &["ip", "-j", "neigh", "show", "dev", "sluice-vxlan"])?;
    let fdb = json(
        &n.ns,
        &["bridge", "-j", "fdb", "show", "dev", "sluice-vxlan"],
    )?;
    for p in c.nodes.iter().filter(|p| p.index != i) {
        let vtep = p.vtep_ip().to_string();
        let route = routes
            .as_array()
            .and_then(|r| r.iter().find(|r| r["dst"] == p.pod_cidr.as_str()))
            .ok_or_else(|| setup(format!("node {i}: no route to {}: {routes}", p.pod_cidr)))?;
        assert_eq!(route["gateway"], vtep.as_str(), "{route}");
        assert!(route.to_string().contains("onlink"), "{route}");
        assert!(
            neighs
                .as_array()
                .is_some_and(|v| v.iter().any(|x| x["dst"] == vtep.as_str()
                    && x["lladdr"] == p.vtep_mac.to_string()
                    && x.to_string().contains("PERMANENT"))),
            "node {i}: neighbors {neighs}"
        );
        assert!(
            fdb.as_array().is_some_and(|v| v.iter().any(
                |x| x["mac"] == p.vtep_mac.to_string() && x["dst"] == p.underlay_ip.to_string()
            )),
            "node {i}: fdb {fdb}"
        );
    }
    Ok(())
}

/// (ifindex, queue) of every entry of node `i`'s pinned `sluice_xsk_slots`.
fn slot_keys(c: &Cluster, i: usize) -> Result<BTreeSet<(u64, u64)>> {
    let v = c.nodes[i].pinned_map("sluice_xsk_slots")?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    let k = &e["formatted"]["key"];
                    Some((k["ifindex"].as_u64()?, k["queue"].as_u64()?))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The interfaces of node `i`'s namespace: ifindex -> name.
fn interfaces(c: &Cluster, i: usize) -> Result<Vec<(u64, String)>> {
    let v = json(&c.nodes[i].ns, &["ip", "-j", "link", "show"])?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| Some((l["ifindex"].as_u64()?, l["ifname"].as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default())
}

/// Slots only for interfaces that exist, one per (interface, queue) the agent has a socket on.
fn check_slots(c: &Cluster, i: usize) -> Result<BTreeSet<(u64, u64)>> {
    let slots = slot_keys(c, i)?;
    let ifs = interfaces(c, i)?;
    let named: Vec<String> = slots
        .iter()
        .map(|(x, q)| {
            let name = ifs
                .iter()
                .find(|(j, _)| j == x)
                .map_or("GONE", |(_, n)| n.as_str());
            format!("{name}({x})/{q}")
        })
        .collect();
    println!("node {i} sluice_xsk_slots: {named:?}");
    assert!(
        !named.iter().any(|n| n.starts_with("GONE")),
        "slots of interfaces that are gone: {named:?}"
    );
    Ok(slots)
}

/// iperf3's per-interval throughput (Gbit/s, interval end in seconds) from the client's JSON.
fn intervals(client_json: &serde_json::Value) -> Vec<(f64, f64)> {
    client_json["intervals"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    (
                        i["sum"]["end"].as_f64().unwrap_or(0.0),
                        i["sum"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILL node 0's agent during a cross-node iperf3 (pod on node 0 to pod on node 1) and a ping
/// every 5 ms in both directions; restart it 2.5 s later. Traffic keeps flowing through the
/// standby path (it carried nothing before), the restarted agent takes it back (the device is
/// idle again), and the restart leaves no slot of a gone interface (the killed agent's punt
/// link) in the pinned maps.
#[test]
fn cross_node_traffic_survives_agent_sigkill_and_restart() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut c = Cluster::new(&[NodeKind::Sluice; 2], AgentOptions::default())?;
        c.start_agents(|_, _| {})?;
        let a = c.add_pod(0, &[])?;
        let b = c.add_pod(1, &[])?;
        let (a_ip, b_ip) = (c.pods[a].ip, c.pods[b].ip);
        let (a_ns, b_ns) = (c.pods[a].ns.clone(), c.pods[b].ns.clone());
        let n0 = c.nodes[0].ns.clone();

        // The standby device's counters while the agents run (checked after the figures: an
        // agent without a standby path has none).
        let idle = packets(&n0, "sluice-vxlan");
        c.ping(a, b_ip, 3)?;
        c.ping(b, a_ip, 3)?;
        c.iperf3(a, b, 1)?;
        let after = packets(&n0, "sluice-vxlan");
        let slots_before = check_slots(&c, 0)?;

        // The run: 8 s of iperf3, pings for 10 s; kill at 2 s, restart at 4.5 s.
        let mut server = in_ns(&b_ns, &["iperf3", "-s", "-1", "-J"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(setup)?;
        std::thread::sleep(Duration::from_millis(300));
        let t_ping = now();
        let p_ab = ping(&a_ns, b_ip, "0.005", 10)?;
        let p_ba = ping(&b_ns, a_ip, "0.005", 10)?;
        let client = in_ns(
            &a_ns,
            &[
                "iperf3",
                "-c",
                &b_ip.to_string(),
                "-t",
                "8",
                "-i",
                "0.5",
                "-J",
                "--connect-timeout",
                "3000",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(setup)?;
        let t0 = now();
        std::thread::sleep(Duration::from_secs(2));
        let t_kill = now();
        c.stop_agent(0, Signal::SIGKILL)?;
        std::thread::sleep(Duration::from_millis(1200));
        let during = packets(&n0, "sluice-vxlan");
        std::thread::sleep(Duration::from_millis(1300));
        let t_restart = now();
        let started = Instant::now();
        c.start_agent(0)?;
        let t_ready = now();
        println!(
            "agent restarted: socket answering after {:.0} ms",
            started.elapsed().as_secs_f64() * 1000.0
        );
        let client_out = client.wait_with_output().map_err(setup)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = server.kill();
        let server_out = server.wait_with_output().map_err(setup)?;
        let ping_end = t_ping + 10.0;
        let (ab, ba) = (
            Pings::collect(p_ab, ping_end)?,
            Pings::collect(p_ba, ping_end)?,
        );

        // Figures first.
        let client_json: serde_json::Value =
            serde_json::from_slice(&client_out.stdout).unwrap_or_default();
        let server_json: serde_json::Value =
            serde_json::from_slice(&server_out.stdout).unwrap_or_default();
        let received = server_json["end"]["sum_received"]["bytes"]
            .as_u64()
            .unwrap_or(0);
        let per = intervals(&client_json);
        let (kill_at, restart_at) = (t_kill - t0, t_restart - t0);
        let phase = |from: f64, to: f64| {
            let v: Vec<f64> = per
                .iter()
                .filter(|(end, _)| *end > from + 0.5 && *end <= to + 0.01)
                .map(|(_, g)| *g)
                .collect();
            (v.iter().sum::<f64>() / v.len().max(1) as f64, v.len())
        };
        println!(
            "iperf3 {a_ip} -> {b_ip}: {received} bytes received; kill at {kill_at:.2} s, restart at {restart_at:.2} s; per 0.5 s: {:?}",
            per.iter()
                .map(|(e, g)| format!("{e:.1}s:{g:.2}"))
                .collect::<Vec<_>>()
        );
        println!(
            "iperf3 Gbit/s: before the kill {:.2}, agent down {:.2}, after the restart {:.2}",
            phase(0.0, kill_at).0,
            phase(kill_at, restart_at).0,
            phase(restart_at + 1.0, 8.0).0
        );
        for (dir, p) in [("a->b", &ab), ("b->a", &ba)] {
            let (kill_gap, kill_lost) = p.gap(t_kill, t_restart);
            let (restart_gap, restart_lost) = p.gap(t_restart, t_ready + 2.0);
            println!(
                "ping {dir} every 5 ms: {} sent, {} lost; longest silence around the SIGKILL {kill_gap:.1} ms ({kill_lost} lost), around the restart {restart_gap:.1} ms ({restart_lost} lost){}",
                p.last_seq,
                p.lost(),
                if p.errors.is_empty() {
                    String::new()
                } else {
                    format!("; ping said: {}", p.errors)
                }
            );
        }
        println!(
            "sluice-vxlan on node 0 (tx, rx packets): idle {idle:?}, after pings and iperf3 {after:?}, 1.2 s after the kill {during:?}"
        );

        // Then the promises. Standby in place on both nodes, idle while the agents ran, busy
        // while node 0's was down.
        for i in 0..2 {
            check_standby_device(&c, i)?;
        }
        let (idle, after, during) = (idle?, after?, during?);
        assert_eq!(
            idle, after,
            "the standby device carried traffic with the agent up"
        );
        assert!(
            during.0 > after.0 && during.1 > after.1,
            "the standby path carried nothing while the agent was down: {after:?} -> {during:?}"
        );
        for (dir, p) in [("a->b", &ab), ("b->a", &ba)] {
            let (g, _) = p.gap(t_kill, t_restart);
            assert!(
                g < 1000.0,
                "{dir}: {g:.0} ms without replies after the kill"
            );
            let (g, _) = p.gap(t_restart, t_ready + 2.0);
            assert!(
                g < 1000.0,
                "{dir}: {g:.0} ms without replies after the restart"
            );
        }
        // TCP backs off after the losses around the kill and the restart: one empty half second
        // at a time is a retransmission timeout, two in a row a stall.
        assert!(
            per.len() >= 14 && !per.windows(2).any(|w| w[0].1 == 0.0 && w[1].1 == 0.0),
            "iperf3 stalled: {per:?}"
        );

        // The restarted agent has the traffic back; the device is idle again.
        c.ping(a, b_ip, 2)?;
        let back = packets(&n0, "sluice-vxlan")?;
        c.ping(a, b_ip, 5)?;
        c.ping(b, a_ip, 5)?;
        assert_eq!(
            back,
            packets(&n0, "sluice-vxlan")?,
            "traffic still on the standby path"
        );
        c.wait_counters(0, |f| f.pods == 1)?;
        check_standby_device(&c, 0)?;
        // The killed agent's punt link is gone: so are its slots.
        let slots_after = check_slots(&c, 0)?;
        assert_eq!(slots_after.len(), slots_before.len(), "slots piled up");

        // A clean stop removes the device with the rest.
        c.stop_agent(0, Signal::SIGTERM)?;
        let links = sluice_e2e::ip(Some(&n0), "-br link")?;
        let links = String::from_utf8_lossy(&links.stdout);
        assert!(!links.contains("sluice-vxlan"), "{links}");
        Ok(())
    })());
}

/// How many of `count` echoes from namespace `ns` to `to` were answered.
fn answered(ns: &str, to: Ipv4Addr, count: u32) -> Result<u32> {
    let out = in_ns(
        ns,
        &[
            "ping",
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            &to.to_string(),
        ],
    )
    .output()
    .map_err(setup)?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split(" received")
        .next()
        .and_then(|l| l.rsplit(", ").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0))
}

/// The standby path opens nothing NetworkPolicy closes: with node 0's agent SIGKILLed, a pod on
/// node 1 reaches an open pod on node 0 through it, but not a pod isolated for ingress (the XDP
/// program drops VXLAN whose inner destination is isolated instead of letting the kernel's device
/// decapsulate it); the restarted agent enforces the policy again.
#[test]
fn isolated_pods_stay_closed_across_nodes_while_the_agent_is_down() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut c = Cluster::new(&[NodeKind::Sluice; 2], AgentOptions::default())?;
        let policies = c.write_manifest("policies.yaml", sluice_e2e::DENY_DB_INGRESS)?;
        c.start_agents(|_, cfg| cfg.manifests.network_policies.push(policies.clone()))?;
        let db = c.add_pod(0, &[("app", "db")])?;
        let open = c.add_pod(0, &[("app", "web")])?;
        let client = c.add_pod(1, &[("role", "client")])?;
        let (db_ip, open_ip) = (c.pods[db].ip, c.pods[open].ip);
        let ns = c.pods[client].ns.clone();

        let up = (answered(&ns, open_ip, 3)?, answered(&ns, db_ip, 3)?);
        c.stop_agent(0, Signal::SIGKILL)?;
        let down = (answered(&ns, open_ip, 5)?, answered(&ns, db_ip, 5)?);
        c.start_agent(0)?;
        c.wait_counters(0, |f| f.pods == 2)?;
        let back = (answered(&ns, open_ip, 3)?, answered(&ns, db_ip, 3)?);
        println!(
            "echoes answered (open pod, isolated pod) from node 1: agent up {up:?}, node 0's agent down {down:?}, restarted {back:?}"
        );
        assert_eq!(up, (3, 0), "agent up");
        assert_eq!(down, (5, 0), "agent down: the standby path");
        assert_eq!(back, (3, 0), "agent restarted");
        Ok(())
    })());
}
