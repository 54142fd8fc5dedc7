//! How `sluicectl trace` prints a trace: the stable JSON document and the table (fields in
//! `control/README.md`, "Trace").

use crate::agent_api::NodeTrace;

/// The version of the JSON document; it changes only when a field changes meaning or goes away.
pub const JSON_VERSION: u32 = 1;

/// The final verdict of a trace over one or more nodes: the last node's.
pub fn final_verdict(nodes: &[NodeTrace]) -> (&str, &str) {
    nodes
        .last()
        .map(|n| (n.verdict.as_str(), n.drop_reason.as_str()))
        .unwrap_or(("", ""))
}

/// One node's trace as JSON.
pub fn node_json(n: &NodeTrace) -> serde_json::Value {
    serde_json::json!({
        "node": n.node,
        "worker": n.worker,
        "generation": n.generation,
        "ingress_ifindex": n.ingress_ifindex,
        "steps": n.steps.iter().map(|s| serde_json::json!({
            "stage": s.stage,
            "result": s.result,
            "detail": s.detail,
        })).collect::<Vec<_>>(),
        "verdict": n.verdict,
        "drop_reason": n.drop_reason,
        "egress_ifindex": n.egress_ifindex,
        "next_node": n.next_node,
        "next_underlay_ip": n.next_underlay_ip,
    })
}

/// A whole trace as JSON: `version`, the final `verdict` and `drop_reason`, `nodes` in the order
/// the packet crossed them, and `note` (empty, or why the trace stops short of the packet's end).
pub fn to_json(nodes: &[NodeTrace], note: &str) -> serde_json::Value {
    let (verdict, drop_reason) = final_verdict(nodes);
    serde_json::json!({
        "version": JSON_VERSION,
        "verdict": verdict,
        "drop_reason": drop_reason,
        "nodes": nodes.iter().map(node_json).collect::<Vec<_>>(),
        "note": note,
    })
}

/// A whole trace as a table: per node a heading, then one line per stage.
pub fn to_table(nodes: &[NodeTrace], note: &str) -> String {
    let mut s = String::new();
    for n in nodes {
        s.push_str(&format!(
            "node {} (worker {}, tables generation {}, in on ifindex {})\n",
            n.node, n.worker, n.generation, n.ingress_ifindex
        ));
        s.push_str(&format!(
            "  {:<10} {:<12} {}\n",
            "STAGE", "RESULT", "DETAIL"
        ));
        for st in &n.steps {
            s.push_str(&format!(
                "  {:<10} {:<12} {}\n",
                st.stage, st.result, st.detail
            ));
        }
    }
    let (verdict, reason) = final_verdict(nodes);
    s.push_str(&format!("verdict: {verdict}"));
    if !reason.is_empty() {
        s.push_str(&format!(" ({reason})"));
    }
    s.push('\n');
    if !note.is_empty() {
        s.push_str(&format!("note: {note}\n"));
    }
    s
}

/// The frames of a classic pcap file (Ethernet link type), in order, for `--pcap` (a record cut
/// short at the end of the file ends the list); or why the file is not one.
pub fn pcap_frames(data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let hdr = data.get(..24).ok_or("too short for a pcap global header")?;
    let le = match u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        m => {
            return Err(format!(
                "not a classic pcap file (magic {m:#010x}; pcapng is not read)"
            ));
        }
    };
    let rd = |b: &[u8]| {
        let a = [b[0], b[1], b[2], b[3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let link = rd(&hdr[20..24]);
    if link != 1 {
        return Err(format!("pcap link type {link} is not Ethernet (1)"));
    }
    let mut out = Vec::new();
    let mut at = 24usize;
    while let Some(rec) = data.get(at..at.saturating_add(16)) {
        let incl = rd(&rec[8..12]) as usize;
        let start = at + 16;
        let Some(frame) = data.get(start..start.saturating_add(incl)) else {
            break;
        };
        out.push(frame.to_vec());
        at = start + incl;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_api::TraceStep;

    fn node(name: &str, verdict: &str, reason: &str) -> NodeTrace {
        NodeTrace {
            node: name.into(),
            steps: vec![TraceStep {
                stage: "verdict".into(),
                result: verdict.into(),
                detail: "x".into(),
            }],
            verdict: verdict.into(),
            drop_reason: reason.into(),
            ..Default::default()
        }
    }

    #[test]
    fn pcap_frames_read_both_byte_orders_and_refuse_others() {
        let mut le = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        le.extend([0; 12]);
        le.extend(1u32.to_le_bytes());
        for f in [&b"abc"[..], &b"defg"[..]] {
            le.extend([0; 8]);
            le.extend((f.len() as u32).to_le_bytes());
            le.extend((f.len() as u32).to_le_bytes());
            le.extend(f);
        }
        le.extend([0; 9]); // a record cut short
        assert_eq!(
            pcap_frames(&le).unwrap(),
            vec![b"abc".to_vec(), b"defg".to_vec()]
        );
        let mut be = vec![0xa1, 0xb2, 0xc3, 0xd4];
        be.extend([0; 16]);
        be.extend(1u32.to_be_bytes());
        assert_eq!(pcap_frames(&be).unwrap(), Vec::<Vec<u8>>::new());
        assert!(pcap_frames(&[0; 10]).is_err());
        assert!(pcap_frames(&[0x0a, 0x0d, 0x0d, 0x0a].repeat(8)).is_err());
        le[20] = 113;
        assert!(pcap_frames(&le).unwrap_err().contains("not Ethernet"));
    }

    #[test]
    fn the_last_node_decides_and_the_json_keeps_its_fields() {
        let nodes = [
            node("n1", "FORWARDED", ""),
            node("n2", "DROPPED", "policy_denied_ingress"),
        ];
        let j = to_json(&nodes, "");
        assert_eq!(j["version"], 1);
        assert_eq!(j["verdict"], "DROPPED");
        assert_eq!(j["drop_reason"], "policy_denied_ingress");
        assert_eq!(j["nodes"][0]["node"], "n1");
        assert_eq!(j["nodes"][1]["steps"][0]["stage"], "verdict");
        let t = to_table(&nodes, "");
        assert!(t.contains("node n2"), "{t}");
        assert!(
            t.ends_with("verdict: DROPPED (policy_denied_ingress)\n"),
            "{t}"
        );
    }
}
