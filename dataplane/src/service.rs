//! Stage `service`: for the first packet of a flow, find the service it addresses (ClusterIP:port,
//! or NodePort on this node's underlay address) and choose a backend with Maglev.
//!
//! sessionAffinity ClientIP: the Maglev key is the client address alone (so every worker and
//! every node picks the same backend for a client while the backend set is unchanged), and each
//! worker remembers the client's backend in an [`AffinityTable`] for the service's timeout
//! (refreshed by every new flow) so a client keeps its backend when backends come or go.

use crate::flow::FlowKey;
use crate::parse::Parsed;
use crate::tables::{ServiceId, Tables};

/// What the service stage found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceOutcome {
    /// The destination is not a service.
    NotService,
    /// A service whose backend was chosen.
    Backend {
        svc: ServiceId,
        ip: [u8; 4],
        port: u16,
        /// Reached through a NodePort (needs SNAT).
        node_port: bool,
    },
    /// A service without a backend.
    NoBackend,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct AffinitySlot {
    client: u32,
    svc: u32,
    backend: u16,
    ip: [u8; 4],
    port: u16,
    expires_ns: u64,
    used: bool,
}

/// A per-worker, fixed-size, direct-mapped table of (client, service) -> backend with expiry.
/// Inserting never allocates; a colliding pair overwrites the older one (that client then falls
/// back to the Maglev choice keyed by its address, which is the same backend while the set is
/// unchanged).
#[derive(Debug)]
pub struct AffinityTable {
    slots: Box<[AffinitySlot]>,
    mask: usize,
}

impl AffinityTable {
    /// A table with `capacity` rounded up to a power of two (at least 1).
    pub fn new(capacity: usize) -> Self {
        let n = capacity.max(1).next_power_of_two();
        Self {
            slots: vec![AffinitySlot::default(); n].into_boxed_slice(),
            mask: n - 1,
        }
    }
    fn slot(&self, client: u32, svc: u32) -> usize {
        (FlowKey {
            src: client.to_be_bytes(),
            dst: svc.to_be_bytes(),
            src_port: 0,
            dst_port: 0,
            proto: 0,
        }
        .hash64() as usize)
            & self.mask
    }
    fn get(&self, client: u32, svc: u32, now: u64) -> Option<&AffinitySlot> {
        let s = self.slots.get(self.slot(client, svc))?;
        (s.used && s.client == client && s.svc == svc && s.expires_ns > now).then_some(s)
    }
    fn put(&mut self, s: AffinitySlot) {
        let i = self.slot(s.client, s.svc);
        if let Some(slot) = self.slots.get_mut(i) {
            *slot = s;
        }
    }
}

/// The Maglev hash of a flow to service `svc`: the client address alone with sessionAffinity,
/// else the whole tuple.
fn maglev_hash(affinity: bool, t: &FlowKey) -> u64 {
    if affinity {
        return FlowKey {
            src: t.src,
            ..FlowKey::default()
        }
        .hash64();
    }
    t.hash64()
}

/// The backend (address, port) Maglev gives a new flow `t` to service `svc`, with no affinity
/// memory: what [`select`] picks unless a sessionAffinity entry says otherwise. Read-only, for
/// steering frames before any worker state is touched.
pub fn maglev_choice(tables: &Tables, svc: ServiceId, t: &FlowKey) -> Option<([u8; 4], u16)> {
    let s = tables.service(svc)?;
    let i = s.maglev.lookup(maglev_hash(s.affinity_timeout_ns > 0, t))?;
    let b = s.spec.backends.get(usize::from(i))?;
    Some((b.ip.octets(), b.port))
}

/// How a new flow's backend was chosen (for a trace: `pipeline::trace`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Not a service, or a service without a backend.
    None,
    /// Maglev: the flow hash's slot in the service's table and the backend index it holds (with
    /// sessionAffinity the hash is of the client address alone, `affinity` true).
    Maglev {
        slot: usize,
        backend: u16,
        affinity: bool,
    },
    /// sessionAffinity: the backend this client was given by an earlier flow, still in the set.
    Remembered { backend: u16 },
}

/// What [`choose`] decided, and the affinity entry [`select`] then writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chosen {
    /// The service the destination is (also when it has no backend).
    pub svc: Option<ServiceId>,
    pub outcome: ServiceOutcome,
    pub how: Choice,
    remember: Option<AffinitySlot>,
}

impl Chosen {
    fn new(outcome: ServiceOutcome) -> Self {
        Self {
            svc: None,
            outcome,
            how: Choice::None,
            remember: None,
        }
    }
}

/// Find the service of a new flow and choose its backend.
#[inline]
pub fn select(
    tables: &Tables,
    affinity: &mut AffinityTable,
    now_ns: u64,
    p: &Parsed,
    from_uplink: bool,
) -> ServiceOutcome {
    let c = choose(tables, affinity, now_ns, p, from_uplink);
    if let Some(s) = c.remember {
        affinity.put(s);
    }
    c.outcome
}

/// What [`select`] decides, without writing the affinity table: the outcome, how the backend was
/// chosen, and the affinity entry `select` writes (a new client's choice, or the refreshed expiry
/// of a remembered one).
#[inline]
pub fn choose(
    tables: &Tables,
    affinity: &AffinityTable,
    now_ns: u64,
    p: &Parsed,
    from_uplink: bool,
) -> Chosen {
    let (svc_id, node_port) = match tables.cluster_ip(p.dst, p.dst_port, p.proto) {
        Some(id) => (id, false),
        None if from_uplink && p.dst == tables.node.underlay_ip.octets() => {
            match tables.node_port(p.dst_port, p.proto) {
                Some(id) => (id, true),
                None => return Chosen::new(ServiceOutcome::NotService),
            }
        }
        None => return Chosen::new(ServiceOutcome::NotService),
    };
    let Some(svc) = tables.service(svc_id) else {
        return Chosen::new(ServiceOutcome::NotService);
    };
    let client = u32::from_be_bytes(p.src);
    let backends = &svc.spec.backends;
    let found = |i: u16| {
        backends
            .get(usize::from(i))
            .map(|b| ServiceOutcome::Backend {
                svc: svc_id,
                ip: b.ip.octets(),
                port: b.port,
                node_port,
            })
            .unwrap_or(ServiceOutcome::NoBackend)
    };
    let no_backend = Chosen {
        svc: Some(svc_id),
        ..Chosen::new(ServiceOutcome::NoBackend)
    };
    let with_affinity = svc.affinity_timeout_ns > 0;
    if with_affinity
        && let Some(s) = affinity.get(client, svc_id.0, now_ns)
        && backends
            .get(usize::from(s.backend))
            .is_some_and(|b| b.ip.octets() == s.ip && b.port == s.port)
    {
        let mut s = *s;
        s.expires_ns = now_ns.saturating_add(svc.affinity_timeout_ns);
        return Chosen {
            svc: Some(svc_id),
            outcome: found(s.backend),
            how: Choice::Remembered { backend: s.backend },
            remember: Some(s),
        };
    }
    let hash = maglev_hash(with_affinity, &p.key());
    let slot = svc.maglev.slot(hash);
    let Some(i) = svc.maglev.lookup(hash) else {
        return no_backend;
    };
    let outcome = found(i);
    if outcome == ServiceOutcome::NoBackend {
        return no_backend;
    }
    let remember = match backends.get(usize::from(i)) {
        Some(b) if with_affinity => Some(AffinitySlot {
            client,
            svc: svc_id.0,
            backend: i,
            ip: b.ip.octets(),
            port: b.port,
            expires_ns: now_ns.saturating_add(svc.affinity_timeout_ns),
            used: true,
        }),
        _ => None,
    };
    Chosen {
        svc: Some(svc_id),
        outcome,
        how: Choice::Maglev {
            slot,
            backend: i,
            affinity: with_affinity,
        },
        remember,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::IcmpKind;

    fn pkt(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> Parsed {
        Parsed {
            l4_off: 34,
            l4_len: 20,
            ip_len: 40,
            proto,
            src,
            dst,
            src_port: sport,
            dst_port: dport,
            tcp_flags: 0,
            icmp: IcmpKind::None,
            ttl: 64,
            dont_frag: true,
            src_mac: crate::wire::ethernet::Mac::default(),
            csum_partial: false,
        }
    }

    #[test]
    fn cluster_ip_node_port_and_misses() {
        let t = crate::tables::tests::demo_tables();
        let mut a = AffinityTable::new(16);
        let o = select(
            &t,
            &mut a,
            0,
            &pkt([10, 244, 1, 2], [10, 96, 0, 10], 1, 80, 6),
            false,
        );
        assert!(matches!(
            o,
            ServiceOutcome::Backend {
                port: 8080,
                node_port: false,
                ..
            }
        ));
        let o = select(
            &t,
            &mut a,
            0,
            &pkt([1, 2, 3, 4], [192, 168, 50, 1], 1, 30080, 6),
            true,
        );
        assert!(matches!(
            o,
            ServiceOutcome::Backend {
                node_port: true,
                ..
            }
        ));
        let o = select(
            &t,
            &mut a,
            0,
            &pkt([1, 2, 3, 4], [192, 168, 50, 1], 1, 30080, 6),
            false,
        );
        assert_eq!(o, ServiceOutcome::NotService);
        let o = select(
            &t,
            &mut a,
            0,
            &pkt([10, 244, 1, 2], [10, 96, 0, 99], 1, 80, 6),
            false,
        );
        assert_eq!(o, ServiceOutcome::NoBackend);
        let o = select(
            &t,
            &mut a,
            0,
            &pkt([10, 244, 1, 2], [10, 244, 2, 3], 1, 80, 6),
            false,
        );
        assert_eq!(o, ServiceOutcome::NotService);
    }

    #[test]
    fn flows_spread_over_backends() {
        let t = crate::tables::tests::demo_tables();
        let mut a = AffinityTable::new(16);
        let mut seen = std::collections::HashSet::new();
        for sport in 0..200 {
            if let ServiceOutcome::Backend { ip, .. } = select(
                &t,
                &mut a,
                0,
                &pkt([10, 244, 1, 2], [10, 96, 0, 10], sport, 80, 6),
                false,
            ) {
                seen.insert(ip);
            }
        }
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn affinity_sticks_until_timeout() {
        let t = crate::tables::tests::demo_tables();
        let mut a = AffinityTable::new(16);
        let first = select(
            &t,
            &mut a,
            0,
            &pkt([10, 244, 1, 2], [10, 96, 0, 53], 1, 53, 17),
            false,
        );
        assert!(matches!(first, ServiceOutcome::Backend { .. }));
        for sport in 2..50 {
            let o = select(
                &t,
                &mut a,
                1_000,
                &pkt([10, 244, 1, 2], [10, 96, 0, 53], sport, 53, 17),
                false,
            );
            assert_eq!(o, first);
        }
        assert!(
            a.get(u32::from_be_bytes([10, 244, 1, 2]), 1, 1_000)
                .is_some()
        );
        // The demo affinity timeout is 10 s; 20 s later the entry is gone.
        assert!(
            a.get(u32::from_be_bytes([10, 244, 1, 2]), 1, 20_000_000_000)
                .is_none()
        );
    }
}
