//! A full node on one worker: every pod socket shares the worker's UMEM, so each must get its own
//! share of chunks to receive into (a pod socket that gets none silently drops everything), and a
//! busy pod must still get deep rings (see `xsk_io::UmemPlan` and `sluice_xdp::fill`).

use sluice_e2e::{AgentOptions, Cluster, NodeKind, Result, require_root, sh};

/// Kubernetes' default maximum of pods per node (kubelet `maxPods`), the agent's `max_pods`.
const PODS: usize = 110;

#[test]
fn a_full_node_of_110_pods_on_one_worker_all_receive() {
    if !require_root() {
        return;
    }
    let r: Result<()> = (|| {
        // One uplink queue: one worker owns every pod's socket.
        let mut c = Cluster::new(&[NodeKind::Sluice], AgentOptions::default())?;
        c.start_agents(|_, _| {})?;
        let pods: Vec<usize> = (0..PODS)
            .map(|_| c.add_pod(0, &[]))
            .collect::<Result<_>>()?;
        let f = c.wait_counters(0, |f| f.pods == PODS)?;
        assert_eq!(f.workers.len(), 1, "one worker");

        // Every pod answers the first one, and the first one answers every pod: each pod socket
        // receives (the reply leaves its pod through its own veth) and transmits.
        let first = c.pods[pods[0]].ns.clone();
        let targets: Vec<String> = pods[1..]
            .iter()
            .map(|&p| c.pods[p].ip.to_string())
            .collect();
        let out = sh(
            &first,
            &format!(
                "lost=0; for ip in {}; do ping -n -c 1 -W 2 $ip >/dev/null || {{ echo unreachable $ip; lost=$((lost+1)); }}; done; echo lost $lost",
                targets.join(" ")
            ),
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains("lost 0"), "pods unreachable:\n{text}");
        let back = c.pods[pods[0]].ip;
        for &p in &pods[1..] {
            c.ping(p, back, 1)?;
        }

        // Traffic to two of them while the other 108 sit idle with their shares.
        for &server in &[pods[1], pods[PODS - 1]] {
            let (bytes, gbps) = c.iperf3(pods[0], server, 2)?;
            println!("iperf3 to pod {server}: {bytes} bytes, {gbps:.2} Gbit/s");
            assert!(bytes > 10_000_000, "pod {server} got {bytes} bytes");
        }
        let f = c.wait_counters(0, |f| f.workers[0].rx >= 4 * (PODS as u64 - 1))?;
        println!("{} pods, worker counters {:?}", f.pods, f.workers);
        let log = c.agent_log(0);
        let umem = log
            .lines()
            .find(|l| l.contains("each worker's UMEM"))
            .unwrap_or("no UMEM line in the agent's log");
        println!("{umem}");
        // 110 pods x 64 chunks + the uplink's ring + the busy pool + the tx reserve, a quarter
        // more for the other workers: 23552 chunks of 4 KiB (92 MiB).
        assert!(umem.contains("23552"), "{umem}");
        Ok(())
    })();
    if let Err(e) = r {
        panic!("{e}");
    }
}
