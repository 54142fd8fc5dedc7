//! Many pods on one worker: every pod socket shares the worker's UMEM, so each must get its own
//! share of chunks to receive into (a pod socket that gets none would silently drop everything).

use sluice_e2e::{AgentOptions, Cluster, NodeKind, Result, require_root};

#[test]
fn twenty_pods_on_one_worker_all_receive() {
    if !require_root() {
        return;
    }
    let r: Result<()> = (|| {
        let mut c = Cluster::new(&[NodeKind::Sluice], AgentOptions::default())?;
        c.start_agents(|_, _| {})?;
        let pods: Vec<usize> = (0..20).map(|_| c.add_pod(0, &[])).collect::<Result<_>>()?;
        // Every pod answers the first one, and the first one answers every pod.
        for &p in &pods[1..] {
            c.ping(pods[0], c.pods[p].ip, 1)?;
            c.ping(p, c.pods[pods[0]].ip, 1)?;
        }
        let f = c.wait_counters(0, |f| f.pods == 20 && f.workers[0].rx >= 2 * 19 * 2)?;
        println!("{} pods, worker counters {:?}", f.pods, f.workers);
        Ok(())
    })();
    if let Err(e) = r {
        panic!("{e}");
    }
}
