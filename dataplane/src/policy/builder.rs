//! The compile step: validated inputs to [`PolicyTable`]s, with incremental updates.
//!
//! The builder keeps what it compiled: selectors, each policy's selected pods (bitsets over pod
//! slots), each rule's peer set, and the compiled per-direction policies keyed by the list of
//! policies selecting a pod. A pod change re-evaluates every selector against that one pod,
//! recompiles only the direction policies whose inputs changed, and publishes a new table.

use super::bitset::Bitset;
use super::cidr::CidrSet;
use super::error::PolicyError;
use super::selector::{LabelIndex, Labels};
use super::spec::{self, CheckedPolicy, EGRESS, INGRESS, NsMatch, Peer, PortMatch};
use super::{
    Class, ContainerPort, DirPolicy, NO_CLASS, Namespace, NetworkPolicy, OTHER_SLOT, PeerSet,
    PodEntry, PodInfo, PodPolicy, PolicyInputs, PolicyTable, Protocol, RuleGrant,
};
use ahash::{AHashMap, AHashSet};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

const NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug)]
struct NsEntry {
    labels: Labels,
    pods: Bitset,
    policies: Vec<u32>,
}

#[derive(Debug)]
struct PolicyState {
    pol: CheckedPolicy,
    ns: u32,
    /// Pods the policy selects (in its namespace).
    target: Bitset,
    /// Per direction and rule: the peers the rule allows.
    rule_sets: [Vec<Arc<PeerSet>>; 2],
    named: [bool; 2],
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SigKey {
    dir: u8,
    policies: Vec<u32>,
    /// The pod's own ports, when an ingress policy uses named ports (they resolve against it).
    own_ports: Option<Vec<ContainerPort>>,
}

/// Compiles [`PolicyInputs`] into [`PolicyTable`]s and keeps them current under changes.
///
/// Every mutator leaves the builder consistent; [`PolicyBuilder::table`] snapshots it. A change
/// to one pod costs one evaluation of each selector against that pod plus the recompilation of
/// the direction policies it touches.
#[derive(Debug)]
pub struct PolicyBuilder {
    node_addrs: AHashSet<u32>,
    namespaces: Vec<NsEntry>,
    ns_index: AHashMap<String, u32>,
    pods: Vec<Option<(PodInfo, u32)>>,
    free_pods: Vec<u32>,
    pod_index: AHashMap<(String, String), u32>,
    pod_by_ip: AHashMap<u32, u32>,
    labels: LabelIndex,
    policies: Vec<Option<PolicyState>>,
    free_policies: Vec<u32>,
    policy_index: AHashMap<(String, String), u32>,
    policy_names: Arc<Vec<String>>,
    selected_by: Vec<[Vec<u32>; 2]>,
    compiled: Vec<PodPolicy>,
    cache: AHashMap<SigKey, Arc<DirPolicy>>,
    /// Label change trigger (see `Selector::triggers`) -> policies with a peer pod selector
    /// that it may affect.
    by_key: AHashMap<(String, Option<String>), Vec<u32>>,
    /// Policies with an `ipBlock` peer (their peer sets depend on pod IPs).
    with_cidrs: Vec<u32>,
}

impl PolicyBuilder {
    /// Validates every policy, then compiles everything. Nothing is built if any policy is
    /// invalid.
    pub fn new(inputs: &PolicyInputs) -> Result<Self, PolicyError> {
        let mut checked = Vec::with_capacity(inputs.policies.len());
        let mut seen = AHashSet::new();
        for np in &inputs.policies {
            let c = spec::check(np)?;
            if !seen.insert((c.namespace.clone(), c.name.clone())) {
                return Err(PolicyError::Duplicate {
                    policy: c.full_name(),
                });
            }
            checked.push(c);
        }
        let mut b = Self {
            node_addrs: inputs.node_addrs.iter().map(|a| u32::from(*a)).collect(),
            namespaces: Vec::new(),
            ns_index: AHashMap::new(),
            pods: Vec::new(),
            free_pods: Vec::new(),
            pod_index: AHashMap::new(),
            pod_by_ip: AHashMap::new(),
            labels: LabelIndex::default(),
            policies: Vec::new(),
            free_policies: Vec::new(),
            policy_index: AHashMap::new(),
            policy_names: Arc::default(),
            selected_by: Vec::new(),
            compiled: Vec::new(),
            cache: AHashMap::new(),
            by_key: AHashMap::new(),
            with_cidrs: Vec::new(),
        };
        for ns in &inputs.namespaces {
            b.put_namespace(ns);
        }
        for pod in &inputs.pods {
            b.insert_pod(pod.clone());
        }
        for c in checked {
            b.insert_policy(c);
        }
        b.rebuild_all();
        Ok(b)
    }

    /// A snapshot to publish. Cheap: shares the compiled direction policies.
    pub fn table(&self) -> PolicyTable {
        PolicyTable {
            pods: self
                .pod_by_ip
                .iter()
                .map(|(&ip, &slot)| {
                    let policy = self.compiled[slot as usize].clone();
                    (ip, PodEntry { slot, policy })
                })
                .collect(),
            node_addrs: self.node_addrs.clone(),
            policy_names: self.policy_names.clone(),
        }
    }

    /// Sets this node's own addresses.
    pub fn set_node_addrs(&mut self, addrs: &[Ipv4Addr]) {
        self.node_addrs = addrs.iter().map(|a| u32::from(*a)).collect();
    }

    /// Adds or updates a pod (labels, IP, ports). Incremental.
    pub fn set_pod(&mut self, pod: PodInfo) {
        let key = (pod.namespace.clone(), pod.name.clone());
        let Some(&slot) = self.pod_index.get(&key) else {
            let slot = self.insert_pod(pod);
            self.pod_changed(slot, None, true, true);
            return;
        };
        let Some((old, ns)) = self.pods[slot as usize].take() else {
            return;
        };
        let labels_changed = old.labels != pod.labels;
        let ip_changed = old.ip != pod.ip;
        let ports_changed = old.ports != pod.ports;
        // (key, Some(value)) for each value a key gained or lost, (key, None) when the key
        // itself appeared or disappeared.
        let mut changed_keys: Vec<(String, Option<String>)> = Vec::new();
        for (k, v) in &old.labels {
            match pod.labels.get(k) {
                Some(nv) if nv == v => {}
                Some(nv) => {
                    changed_keys.push((k.clone(), Some(v.clone())));
                    changed_keys.push((k.clone(), Some(nv.clone())));
                }
                None => {
                    changed_keys.push((k.clone(), Some(v.clone())));
                    changed_keys.push((k.clone(), None));
                }
            }
        }
        for (k, v) in &pod.labels {
            if !old.labels.contains_key(k) {
                changed_keys.push((k.clone(), Some(v.clone())));
                changed_keys.push((k.clone(), None));
            }
        }
        if labels_changed {
            self.labels.remove(slot, &old.labels);
            self.labels.insert(slot, &pod.labels);
        }
        if old.ip != pod.ip {
            let old_ip = u32::from(old.ip);
            if self.pod_by_ip.get(&old_ip) == Some(&slot) {
                self.pod_by_ip.remove(&old_ip);
            }
            self.pod_by_ip.insert(u32::from(pod.ip), slot);
        }
        self.compiled[slot as usize].local = pod.local;
        self.pods[slot as usize] = Some((pod, ns));
        if labels_changed || ip_changed || ports_changed {
            self.pod_changed(
                slot,
                Some(&changed_keys),
                ip_changed,
                ip_changed || ports_changed,
            );
        }
    }

    /// Removes a pod; returns whether it existed. Incremental.
    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> bool {
        let Some(slot) = self
            .pod_index
            .remove(&(namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        let Some((old, ns)) = self.pods[slot as usize].take() else {
            return false;
        };
        self.labels.remove(slot, &old.labels);
        self.namespaces[ns as usize].pods.set(slot, false);
        let ip = u32::from(old.ip);
        if self.pod_by_ip.get(&ip) == Some(&slot) {
            self.pod_by_ip.remove(&ip);
        }
        let mut dirty = Bitset::default();
        for (p, st) in self.policies.iter_mut().enumerate() {
            let Some(st) = st else { continue };
            st.target.set(slot, false);
            for sets in &mut st.rule_sets {
                for set in sets.iter_mut() {
                    if set.pods.contains(slot) {
                        Arc::make_mut(set).pods.set(slot, false);
                        dirty.set(p as u32, true);
                    }
                }
            }
            if st.named[EGRESS] {
                dirty.set(p as u32, true);
            }
        }
        self.selected_by[slot as usize] = Default::default();
        self.compiled[slot as usize] = PodPolicy::default();
        self.free_pods.push(slot);
        self.refresh(&dirty, None);
        true
    }

    /// Adds or updates a namespace (its labels). Re-evaluates all selectors.
    pub fn set_namespace(&mut self, ns: &Namespace) {
        self.put_namespace(ns);
        self.rebuild_all();
    }

    /// Adds or replaces a policy. On error nothing changes.
    pub fn set_policy(&mut self, np: &NetworkPolicy) -> Result<(), PolicyError> {
        let c = spec::check(np)?;
        let key = (c.namespace.clone(), c.name.clone());
        let (p, old_target) = match self.policy_index.get(&key) {
            Some(&p) => match self.policies[p as usize].as_mut() {
                Some(st) => {
                    st.named = [c.has_named_port(INGRESS), c.has_named_port(EGRESS)];
                    st.pol = c;
                    (p, std::mem::take(&mut st.target))
                }
                None => return Ok(()),
            },
            None => (self.insert_policy(c), Bitset::default()),
        };
        if let Some(st) = self.policies[p as usize].take() {
            let ips = self.sorted_ips();
            let st = self.evaluate_policy(st.pol, st.ns, &ips);
            self.policies[p as usize] = Some(st);
        }
        self.unindex_policy(p);
        self.index_policy(p);
        self.policy_changed(p, old_target);
        Ok(())
    }

    /// Removes a policy; returns whether it existed.
    pub fn remove_policy(&mut self, namespace: &str, name: &str) -> bool {
        let Some(p) = self
            .policy_index
            .remove(&(namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        let Some(st) = self.policies[p as usize].take() else {
            return false;
        };
        self.namespaces[st.ns as usize].policies.retain(|&q| q != p);
        self.unindex_policy(p);
        self.free_policies.push(p);
        Arc::make_mut(&mut self.policy_names)[p as usize].clear();
        self.policy_changed(p, st.target);
        true
    }

    // ---- internals ----

    fn ensure_ns(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.ns_index.get(name) {
            return i;
        }
        let i = self.namespaces.len() as u32;
        let mut labels = Labels::new();
        labels.insert(NAME_LABEL.to_owned(), name.to_owned());
        self.namespaces.push(NsEntry {
            labels,
            pods: Bitset::default(),
            policies: Vec::new(),
        });
        self.ns_index.insert(name.to_owned(), i);
        i
    }

    fn put_namespace(&mut self, ns: &Namespace) {
        let Some(name) = ns.metadata.name.as_deref() else {
            return;
        };
        let i = self.ensure_ns(name);
        let mut labels = ns.metadata.labels.clone().unwrap_or_default();
        labels.insert(NAME_LABEL.to_owned(), name.to_owned());
        self.namespaces[i as usize].labels = labels;
    }

    fn insert_pod(&mut self, pod: PodInfo) -> u32 {
        let key = (pod.namespace.clone(), pod.name.clone());
        if let Some(&slot) = self.pod_index.get(&key) {
            // Duplicate in the inputs: the later one wins.
            if let Some((old, _)) = &self.pods[slot as usize] {
                self.labels.remove(slot, &old.labels);
            }
            self.labels.insert(slot, &pod.labels);
            self.pod_by_ip.insert(u32::from(pod.ip), slot);
            self.compiled[slot as usize].local = pod.local;
            let ns = self.ensure_ns(&pod.namespace);
            self.pods[slot as usize] = Some((pod, ns));
            return slot;
        }
        let ns = self.ensure_ns(&pod.namespace);
        let slot = match self.free_pods.pop() {
            Some(s) => s,
            None => {
                self.pods.push(None);
                self.selected_by.push(Default::default());
                self.compiled.push(PodPolicy::default());
                (self.pods.len() - 1) as u32
            }
        };
        self.labels.insert(slot, &pod.labels);
        self.namespaces[ns as usize].pods.set(slot, true);
        self.pod_by_ip.insert(u32::from(pod.ip), slot);
        self.pod_index.insert(key, slot);
        self.compiled[slot as usize] = PodPolicy {
            dirs: [None, None],
            local: pod.local,
        };
        self.pods[slot as usize] = Some((pod, ns));
        slot
    }

    /// Adds a checked policy (not evaluated yet).
    fn insert_policy(&mut self, c: CheckedPolicy) -> u32 {
        let ns = self.ensure_ns(&c.namespace);
        let key = (c.namespace.clone(), c.name.clone());
        let name = c.full_name();
        let st = PolicyState {
            named: [c.has_named_port(INGRESS), c.has_named_port(EGRESS)],
            rule_sets: [Vec::new(), Vec::new()],
            target: Bitset::default(),
            ns,
            pol: c,
        };
        let p = match self.free_policies.pop() {
            Some(p) => {
                self.policies[p as usize] = Some(st);
                p
            }
            None => {
                self.policies.push(Some(st));
                (self.policies.len() - 1) as u32
            }
        };
        let names = Arc::make_mut(&mut self.policy_names);
        if names.len() <= p as usize {
            names.resize(p as usize + 1, String::new());
        }
        names[p as usize] = name;
        self.namespaces[ns as usize].policies.push(p);
        self.policy_index.insert(key, p);
        self.index_policy(p);
        p
    }

    /// Records which label keys policy `p`'s peer selectors look at, and whether it has ipBlocks.
    fn index_policy(&mut self, p: u32) {
        let Some(st) = &self.policies[p as usize] else {
            return;
        };
        let mut keys: Vec<(&str, Option<&str>)> = Vec::new();
        let mut cidrs = false;
        for rule in st.pol.rules.iter().flatten() {
            for peer in rule.peers.iter().flatten() {
                match peer {
                    Peer::Block(_) => cidrs = true,
                    Peer::Pods { pods, .. } => keys.extend(pods.triggers()),
                }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        for (k, v) in keys {
            self.by_key
                .entry((k.to_owned(), v.map(str::to_owned)))
                .or_default()
                .push(p);
        }
        if cidrs {
            self.with_cidrs.push(p);
        }
    }

    fn unindex_policy(&mut self, p: u32) {
        for list in self.by_key.values_mut() {
            list.retain(|&q| q != p);
        }
        self.with_cidrs.retain(|&q| q != p);
    }

    /// Pod IPs with their slots, sorted by IP.
    fn sorted_ips(&self) -> Vec<(u32, u32)> {
        let mut v: Vec<(u32, u32)> = self.pod_by_ip.iter().map(|(&ip, &s)| (ip, s)).collect();
        v.sort_unstable();
        v
    }

    fn ns_matches(&self, m: &NsMatch, policy_ns: u32, ns: u32) -> bool {
        match m {
            NsMatch::Own => policy_ns == ns,
            NsMatch::Matching(sel) => sel.matches(&self.namespaces[ns as usize].labels),
        }
    }

    /// Computes a policy's target and rule peer sets over all pods.
    fn evaluate_policy(&self, pol: CheckedPolicy, ns: u32, ips: &[(u32, u32)]) -> PolicyState {
        let own = &self.namespaces[ns as usize].pods;
        let mut target = if pol.target.is_empty() {
            own.clone()
        } else {
            pol.target.eval(&self.labels, own)
        };
        target.shrink();
        let mut rule_sets: [Vec<Arc<PeerSet>>; 2] = [Vec::new(), Vec::new()];
        for d in [INGRESS, EGRESS] {
            for rule in &pol.rules[d] {
                let mut set = PeerSet {
                    any: rule.peers.is_none(),
                    ..PeerSet::default()
                };
                for peer in rule.peers.iter().flatten() {
                    match peer {
                        Peer::Block(c) => set.cidrs.union_with(c),
                        Peer::Pods { ns: m, pods } => {
                            let mut universe = Bitset::default();
                            for (i, e) in self.namespaces.iter().enumerate() {
                                if self.ns_matches(m, ns, i as u32) {
                                    universe.union_with(&e.pods);
                                }
                            }
                            if pods.is_empty() {
                                set.pods.union_with(&universe);
                            } else {
                                set.pods.union_with(&pods.eval(&self.labels, &universe));
                            }
                        }
                    }
                }
                // Pods whose IP is in an ipBlock are peers by address.
                for &(lo, hi) in set.cidrs.intervals() {
                    let start = ips.partition_point(|&(ip, _)| ip < lo);
                    for &(ip, slot) in &ips[start..] {
                        if ip > hi {
                            break;
                        }
                        set.pods.set(slot, true);
                    }
                }
                set.pods.shrink();
                rule_sets[d].push(Arc::new(set));
            }
        }
        PolicyState {
            named: [pol.has_named_port(INGRESS), pol.has_named_port(EGRESS)],
            pol,
            ns,
            target,
            rule_sets,
        }
    }

    /// Re-evaluates everything from the compiled selectors.
    fn rebuild_all(&mut self) {
        let ips = self.sorted_ips();
        for p in 0..self.policies.len() {
            if let Some(st) = self.policies[p].take() {
                self.policies[p] = Some(self.evaluate_policy(st.pol, st.ns, &ips));
            }
        }
        for s in &mut self.selected_by {
            *s = Default::default();
        }
        for (p, st) in self.policies.iter().enumerate() {
            let Some(st) = st else { continue };
            for d in [INGRESS, EGRESS] {
                if st.pol.isolates[d] {
                    for s in st.target.iter() {
                        if let Some(sel) = self.selected_by.get_mut(s as usize) {
                            sel[d].push(p as u32);
                        }
                    }
                }
            }
        }
        self.cache.clear();
        for slot in 0..self.pods.len() as u32 {
            if self.pods[slot as usize].is_some() {
                self.refresh_dir(slot, INGRESS);
                self.refresh_dir(slot, EGRESS);
            }
        }
    }

    /// Pod `slot` was added (`changed_keys` None) or changed (labels under `changed_keys`, IP,
    /// ports): update the selections it is in and recompile what depends on it. Only policies
    /// with a peer selector requirement on a changed label value (or key presence), or with
    /// ipBlocks when the IP changed, are re-evaluated.
    fn pod_changed(
        &mut self,
        slot: u32,
        changed_keys: Option<&[(String, Option<String>)]>,
        ip_changed: bool,
        structural: bool,
    ) {
        let mut dirty = Bitset::default();
        let Some((pod, pod_ns)) = self.pods[slot as usize].as_ref() else {
            return;
        };
        let pod_ns = *pod_ns;
        let ip = u32::from(pod.ip);
        let candidates: Vec<u32> = match changed_keys {
            None => (0..self.policies.len() as u32).collect(),
            Some(keys) => {
                let mut c = Bitset::default();
                for k in keys {
                    for &p in self.by_key.get(k).into_iter().flatten() {
                        c.set(p, true);
                    }
                }
                if ip_changed {
                    for &p in &self.with_cidrs {
                        c.set(p, true);
                    }
                }
                c.iter().collect()
            }
        };
        let ns_labels = &self.namespaces[pod_ns as usize].labels;
        for p in candidates {
            let Some(st) = self.policies[p as usize].as_mut() else {
                continue;
            };
            for d in [INGRESS, EGRESS] {
                for (ri, rule) in st.pol.rules[d].iter().enumerate() {
                    let Some(peers) = &rule.peers else { continue };
                    let set = &mut st.rule_sets[d][ri];
                    let m = set.cidrs.contains(ip)
                        || peers.iter().any(|peer| match peer {
                            Peer::Block(_) => false,
                            Peer::Pods { ns, pods } => {
                                let ns_ok = match ns {
                                    NsMatch::Own => st.ns == pod_ns,
                                    NsMatch::Matching(sel) => sel.matches(ns_labels),
                                };
                                ns_ok && pods.matches(&pod.labels)
                            }
                        });
                    if set.pods.contains(slot) != m {
                        Arc::make_mut(set).pods.set(slot, m);
                        dirty.set(p, true);
                    }
                }
            }
        }
        if changed_keys.is_none_or(|k| !k.is_empty()) {
            let mut sel: [Vec<u32>; 2] = Default::default();
            for &p in &self.namespaces[pod_ns as usize].policies {
                let Some(st) = self.policies[p as usize].as_mut() else {
                    continue;
                };
                let m = st.pol.target.matches(&pod.labels);
                st.target.set(slot, m);
                if m {
                    for d in [INGRESS, EGRESS] {
                        if st.pol.isolates[d] {
                            sel[d].push(p);
                        }
                    }
                }
            }
            sel[0].sort_unstable();
            sel[1].sort_unstable();
            self.selected_by[slot as usize] = sel;
        }
        if structural {
            for (p, st) in self.policies.iter().enumerate() {
                if st.as_ref().is_some_and(|st| st.named[EGRESS]) {
                    dirty.set(p as u32, true);
                }
            }
        }
        self.refresh(&dirty, Some(slot));
    }

    /// Policy `p` changed (or was removed): pods it selected before (`old_target`) or now need
    /// their selections and compiled policies redone.
    fn policy_changed(&mut self, p: u32, old_target: Bitset) {
        let mut affected = old_target;
        if let Some(st) = &self.policies[p as usize] {
            affected.union_with(&st.target);
        }
        for s in affected.iter() {
            let Some(sel) = self.selected_by.get_mut(s as usize) else {
                continue;
            };
            for (d, list) in sel.iter_mut().enumerate() {
                list.retain(|&q| q != p);
                if let Some(st) = &self.policies[p as usize]
                    && st.pol.isolates[d]
                    && st.target.contains(s)
                {
                    list.push(p);
                    list.sort_unstable();
                }
            }
        }
        let mut dirty = Bitset::default();
        dirty.set(p, true);
        self.refresh(&dirty, None);
        for s in affected.iter() {
            if self.pods.get(s as usize).is_some_and(Option::is_some) {
                self.refresh_dir(s, INGRESS);
                self.refresh_dir(s, EGRESS);
            }
        }
    }

    /// Drops compiled policies that depend on `dirty` policies and recompiles the pods using
    /// them (and `also`).
    fn refresh(&mut self, dirty: &Bitset, also: Option<u32>) {
        if !dirty.is_empty() {
            self.cache
                .retain(|k, _| !k.policies.iter().any(|&p| dirty.contains(p)));
        }
        for slot in 0..self.pods.len() as u32 {
            if self.pods[slot as usize].is_none() {
                continue;
            }
            for d in [INGRESS, EGRESS] {
                let uses_dirty = !dirty.is_empty()
                    && self.selected_by[slot as usize][d]
                        .iter()
                        .any(|&p| dirty.contains(p));
                if uses_dirty || also == Some(slot) {
                    self.refresh_dir(slot, d);
                }
            }
        }
    }

    fn refresh_dir(&mut self, slot: u32, dir: usize) {
        let sel = &self.selected_by[slot as usize][dir];
        if sel.is_empty() {
            self.compiled[slot as usize].dirs[dir] = None;
            return;
        }
        let own_ports = (dir == INGRESS
            && sel.iter().any(|&p| {
                self.policies[p as usize]
                    .as_ref()
                    .is_some_and(|st| st.named[INGRESS])
            }))
        .then(|| {
            let mut ports = self.pods[slot as usize]
                .as_ref()
                .map(|(pod, _)| pod.ports.clone())
                .unwrap_or_default();
            ports.sort_unstable();
            ports
        });
        let key = SigKey {
            dir: dir as u8,
            policies: sel.clone(),
            own_ports,
        };
        let compiled = match self.cache.get(&key) {
            Some(c) => c.clone(),
            None => {
                let c = Arc::new(self.build_dir(dir, &key.policies, key.own_ports.as_deref()));
                self.cache.insert(key, c.clone());
                c
            }
        };
        self.compiled[slot as usize].dirs[dir] = Some(compiled);
    }

    /// Pods that `set` allows and that expose `name`/`protocol`, grouped by port number.
    fn named_egress_groups(
        &self,
        set: &PeerSet,
        name: &str,
        protocol: Protocol,
    ) -> BTreeMap<u16, Bitset> {
        let mut groups: BTreeMap<u16, Bitset> = BTreeMap::new();
        let mut consider = |t: u32| {
            if let Some(Some((pod, _))) = self.pods.get(t as usize)
                && set.allows(Some(t), u32::from(pod.ip))
                && let Some(n) = resolve(&pod.ports, name, protocol)
            {
                groups.entry(n).or_default().set(t, true);
            }
        };
        if set.any {
            (0..self.pods.len() as u32).for_each(&mut consider);
        } else {
            set.pods.iter().for_each(&mut consider);
        }
        groups
    }

    fn build_dir(
        &self,
        dir: usize,
        policies: &[u32],
        own_ports: Option<&[ContainerPort]>,
    ) -> DirPolicy {
        struct Grant {
            slot: usize,
            lo: u16,
            hi: u16,
            set: Arc<PeerSet>,
            by: u32,
            rule: u32,
        }
        let mut grants = Vec::new();
        for &p in policies {
            let Some(st) = &self.policies[p as usize] else {
                continue;
            };
            for (ri, rule) in st.pol.rules[dir].iter().enumerate() {
                let set = &st.rule_sets[dir][ri];
                let Some(ports) = &rule.ports else {
                    for slot in 0..=OTHER_SLOT {
                        grants.push(Grant {
                            slot,
                            lo: 0,
                            hi: u16::MAX,
                            set: set.clone(),
                            by: p,
                            rule: ri as u32,
                        });
                    }
                    continue;
                };
                for ps in ports {
                    let slot = super::slot(ps.protocol);
                    match &ps.port {
                        PortMatch::Range(lo, hi) => {
                            grants.push(Grant {
                                slot,
                                lo: *lo,
                                hi: *hi,
                                set: set.clone(),
                                by: p,
                                rule: ri as u32,
                            });
                        }
                        PortMatch::Named(name) if dir == INGRESS => {
                            if let Some(n) = resolve(own_ports.unwrap_or(&[]), name, ps.protocol) {
                                grants.push(Grant {
                                    slot,
                                    lo: n,
                                    hi: n,
                                    set: set.clone(),
                                    by: p,
                                    rule: ri as u32,
                                });
                            }
                        }
                        PortMatch::Named(name) => {
                            for (n, pods) in self.named_egress_groups(set, name, ps.protocol) {
                                let set = Arc::new(PeerSet {
                                    any: false,
                                    pods,
                                    cidrs: CidrSet::default(),
                                });
                                grants.push(Grant {
                                    slot,
                                    lo: n,
                                    hi: n,
                                    set,
                                    by: p,
                                    rule: ri as u32,
                                });
                            }
                        }
                    }
                }
            }
        }

        let mut classes: Vec<Class> = Vec::new();
        let mut class_ids: AHashMap<Vec<usize>, u32> = AHashMap::new();
        let mut segs: Vec<(u16, u32)> = Vec::new();
        let mut ranges = [(0u32, 0u32); 4];
        for (slot, range) in ranges.iter_mut().enumerate() {
            let gs: Vec<usize> = (0..grants.len())
                .filter(|&g| grants[g].slot == slot)
                .collect();
            let mut bounds: Vec<u32> = vec![0];
            for &g in &gs {
                bounds.push(u32::from(grants[g].lo));
                if grants[g].hi < u16::MAX {
                    bounds.push(u32::from(grants[g].hi) + 1);
                }
            }
            bounds.sort_unstable();
            bounds.dedup();
            let first = segs.len();
            for b in bounds {
                let cover: Vec<usize> = gs
                    .iter()
                    .copied()
                    .filter(|&g| u32::from(grants[g].lo) <= b && b <= u32::from(grants[g].hi))
                    .collect();
                let c = if cover.is_empty() {
                    NO_CLASS
                } else if let Some(&c) = class_ids.get(&cover) {
                    c
                } else {
                    // `cover` is in grant order, which is increasing policy order.
                    let members: Vec<(u32, &PeerSet)> = cover
                        .iter()
                        .map(|&g| (grants[g].by, &*grants[g].set))
                        .collect();
                    classes.push(Class::build(&members));
                    let c = (classes.len() - 1) as u32;
                    class_ids.insert(cover, c);
                    c
                };
                if segs.len() > first && segs.last().map(|s| s.1) == Some(c) {
                    continue;
                }
                segs.push((b as u16, c));
            }
            *range = (first as u32, segs.len() as u32);
        }
        DirPolicy {
            ranges,
            segs: segs.into_boxed_slice(),
            classes: classes.into_boxed_slice(),
            policies: policies.into(),
            grants: grants
                .into_iter()
                .map(|g| RuleGrant {
                    slot: g.slot,
                    lo: g.lo,
                    hi: g.hi,
                    set: g.set,
                    policy: g.by,
                    rule: g.rule,
                })
                .collect(),
        }
    }
}

/// The number a named port has on a pod (by name and protocol).
fn resolve(ports: &[ContainerPort], name: &str, protocol: Protocol) -> Option<u16> {
    ports
        .iter()
        .find(|p| p.protocol == protocol && p.name.as_deref() == Some(name))
        .map(|p| p.port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::proto;
    use crate::policy::{Direction, PolicyId, PolicyQuery, PolicyVerdict};

    fn pod(name: &str, app: &str, ip: [u8; 4], http: u16) -> PodInfo {
        PodInfo {
            namespace: "ns".into(),
            name: name.into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            ip: Ipv4Addr::from(ip),
            ports: vec![ContainerPort {
                name: Some("http".into()),
                port: http,
                protocol: Protocol::Tcp,
            }],
            local: true,
        }
    }

    fn policy(name: &str, json: serde_json::Value) -> NetworkPolicy {
        let mut np: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": json,
        }))
        .unwrap();
        np.metadata.namespace = Some("ns".into());
        np
    }

    fn q(src: [u8; 4], dst: [u8; 4], port: u16) -> PolicyQuery {
        PolicyQuery {
            src: Ipv4Addr::from(src),
            dst: Ipv4Addr::from(dst),
            proto: proto::TCP,
            dst_port: port,
        }
    }

    #[test]
    fn overlapping_port_ranges_split_into_segments_with_attribution() {
        let inputs = PolicyInputs {
            pods: vec![
                pod("server", "server", [10, 0, 0, 1], 8080),
                pod("web", "web", [10, 0, 0, 2], 8080),
                pod("db", "db", [10, 0, 0, 3], 8080),
            ],
            policies: vec![
                policy(
                    "from-web",
                    serde_json::json!({
                        "podSelector": {"matchLabels": {"app": "server"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                     "ports": [{"port": 80, "endPort": 90}]}],
                    }),
                ),
                policy(
                    "from-db",
                    serde_json::json!({
                        "podSelector": {"matchLabels": {"app": "server"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}],
                                     "ports": [{"port": 85, "endPort": 100}, {"port": "http"}]}],
                    }),
                ),
            ],
            ..Default::default()
        };
        let b = PolicyBuilder::new(&inputs).unwrap();
        let t = b.table();
        let (web, db, server) = ([10, 0, 0, 2], [10, 0, 0, 3], [10, 0, 0, 1]);
        let deny = PolicyVerdict::Deny {
            direction: Direction::Ingress,
        };
        let by = |p: u32| PolicyVerdict::Allow {
            by: Some(PolicyId(p)),
        };
        assert_eq!(t.decide(&q(web, server, 79)), deny);
        assert_eq!(t.decide(&q(web, server, 80)), by(0));
        assert_eq!(t.decide(&q(web, server, 90)), by(0));
        assert_eq!(t.decide(&q(web, server, 91)), deny);
        assert_eq!(t.decide(&q(db, server, 84)), deny);
        assert_eq!(t.decide(&q(db, server, 85)), by(1));
        assert_eq!(t.decide(&q(db, server, 100)), by(1));
        assert_eq!(t.decide(&q(db, server, 8080)), by(1));
        assert_eq!(t.decide(&q(web, server, 8080)), deny);
        // Only `server` is isolated, and only for ingress.
        let iso = |ip: [u8; 4]| t.isolation(Ipv4Addr::from(ip));
        assert_eq!(
            iso(server),
            crate::policy::Isolation {
                ingress: true,
                egress: false
            }
        );
        assert_eq!(iso(web), crate::policy::Isolation::default());
        assert_eq!(iso([10, 9, 9, 9]), crate::policy::Isolation::default());
        // Both policies select only `server`: one compiled ingress policy, none for the others.
        assert_eq!(b.cache.len(), 1);
        assert!(t.policy_name(PolicyId(1)) == Some("ns/from-db"));
    }

    #[test]
    fn pods_with_the_same_selecting_policies_share_compiled_policy() {
        let inputs = PolicyInputs {
            pods: (0..10)
                .map(|i| pod(&format!("p{i}"), "web", [10, 0, 0, i as u8 + 1], 8080))
                .collect(),
            policies: vec![policy("deny", serde_json::json!({"podSelector": {}}))],
            ..Default::default()
        };
        let b = PolicyBuilder::new(&inputs).unwrap();
        assert_eq!(b.cache.len(), 1);
        let first = b.compiled[0].dirs[INGRESS].as_ref().unwrap();
        assert!(
            b.compiled
                .iter()
                .all(|p| Arc::ptr_eq(p.dirs[INGRESS].as_ref().unwrap(), first))
        );
    }
}
