//! Flow event filters shared by the agent's `Observe` RPC and `sluicectl observe`.

use crate::agent_api::{FlowEvent, ObserveRequest};

/// Whether `ev` passes every filter set in `req` (time and count limits aside: `since_unix_ns`
/// is checked, `last` and `follow` are the server's business).
pub fn matches(req: &ObserveRequest, ev: &FlowEvent) -> bool {
    let pods = [&ev.src_pod, &ev.dst_pod, &ev.backend_pod];
    let in_ns = |ns: &str| {
        pods.iter()
            .any(|p| p.split_once('/').is_some_and(|(n, _)| n == ns))
    };
    let side = |want: &str, ips: &[&str], pods: &[&str]| {
        if want.contains('/') {
            pods.contains(&want)
        } else {
            ips.contains(&want)
        }
    };
    (req.verdict.is_empty() || req.verdict.eq_ignore_ascii_case(&ev.verdict))
        && (req.pod.is_empty() || pods.iter().any(|p| **p == req.pod))
        && (req.namespace.is_empty() || in_ns(&req.namespace))
        && (req.from.is_empty() || side(&req.from, &[&ev.src_ip], &[&ev.src_pod]))
        && (req.to.is_empty()
            || side(
                &req.to,
                &[&ev.dst_ip, &ev.backend_ip],
                &[&ev.dst_pod, &ev.backend_pod],
            ))
        && (req.port == 0 || req.port == ev.dst_port || req.port == ev.backend_port)
        && (req.protocol.is_empty() || req.protocol.eq_ignore_ascii_case(&ev.protocol))
        && (req.node.is_empty() || req.node == ev.node)
        && ev.time_unix_ns >= req.since_unix_ns
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> FlowEvent {
        FlowEvent {
            time_unix_ns: 100,
            node: "a".into(),
            verdict: "DROPPED".into(),
            protocol: "TCP".into(),
            src_ip: "10.244.1.2".into(),
            src_pod: "default/client".into(),
            dst_ip: "10.96.0.10".into(),
            dst_port: 80,
            backend_ip: "10.244.2.3".into(),
            backend_port: 8080,
            backend_pod: "web/server".into(),
            ..Default::default()
        }
    }

    #[test]
    fn filters() {
        let yes = |r: ObserveRequest| assert!(matches(&r, &ev()), "{r:?}");
        let no = |r: ObserveRequest| assert!(!matches(&r, &ev()), "{r:?}");
        yes(ObserveRequest::default());
        yes(ObserveRequest {
            verdict: "dropped".into(),
            pod: "web/server".into(),
            namespace: "default".into(),
            from: "10.244.1.2".into(),
            to: "web/server".into(),
            port: 8080,
            protocol: "tcp".into(),
            node: "a".into(),
            since_unix_ns: 100,
            ..Default::default()
        });
        yes(ObserveRequest {
            to: "10.96.0.10".into(),
            port: 80,
            ..Default::default()
        });
        no(ObserveRequest {
            verdict: "FORWARDED".into(),
            ..Default::default()
        });
        no(ObserveRequest {
            from: "web/server".into(),
            ..Default::default()
        });
        no(ObserveRequest {
            namespace: "kube-system".into(),
            ..Default::default()
        });
        no(ObserveRequest {
            port: 443,
            ..Default::default()
        });
        no(ObserveRequest {
            since_unix_ns: 101,
            ..Default::default()
        });
        no(ObserveRequest {
            node: "b".into(),
            ..Default::default()
        });
    }
}

/// Parse a `--since` duration: a number with unit `ms`, `s`, `m` or `h` (e.g. `30s`, `5m`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?}: missing unit (ms, s, m, h)"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number then a unit, e.g. 30s"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Ok(std::time::Duration::from_millis(n.saturating_mul(ms)))
}

/// One event as a JSON object (the stable `-o json` form: every field of [`FlowEvent`] under its
/// proto name, plus `time` in RFC 3339 UTC).
pub fn to_json(ev: &FlowEvent) -> serde_json::Value {
    serde_json::json!({
        "time": rfc3339(ev.time_unix_ns),
        "time_unix_ns": ev.time_unix_ns,
        "node": ev.node,
        "worker": ev.worker,
        "kind": ev.kind,
        "verdict": ev.verdict,
        "drop_reason": ev.drop_reason,
        "protocol": ev.protocol,
        "src_ip": ev.src_ip,
        "src_port": ev.src_port,
        "src_pod": ev.src_pod,
        "dst_ip": ev.dst_ip,
        "dst_port": ev.dst_port,
        "dst_pod": ev.dst_pod,
        "service": ev.service,
        "backend_ip": ev.backend_ip,
        "backend_port": ev.backend_port,
        "backend_pod": ev.backend_pod,
        "policy_verdict": ev.policy_verdict,
        "policy": ev.policy,
        "policy_direction": ev.policy_direction,
        "ingress_ifindex": ev.ingress_ifindex,
        "egress_ifindex": ev.egress_ifindex,
        "packets_out": ev.packets_out,
        "packets_in": ev.packets_in,
        "bytes_out": ev.bytes_out,
        "bytes_in": ev.bytes_in,
    })
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of Unix nanoseconds.
pub fn rfc3339(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let ms = (unix_ns / 1_000_000) % 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn endpoint(pod: &str, ip: &str, port: u32) -> String {
    let who = if pod.is_empty() { ip } else { pod };
    if port == 0 {
        who.to_owned()
    } else {
        format!("{who}:{port}")
    }
}

/// The header of the table form.
pub const TABLE_HEADER: &str =
    "TIME                     NODE      VERDICT    PROTO  SOURCE -> DESTINATION  REASON";

/// One event as a table line.
pub fn to_table_row(ev: &FlowEvent) -> String {
    let mut dst = endpoint(&ev.dst_pod, &ev.dst_ip, ev.dst_port);
    if !ev.backend_ip.is_empty() {
        dst = format!(
            "{dst} => {}",
            endpoint(&ev.backend_pod, &ev.backend_ip, ev.backend_port)
        );
    }
    if !ev.service.is_empty() {
        dst = format!("{dst} (svc {})", ev.service);
    }
    let reason = match (ev.drop_reason.as_str(), ev.kind.as_str()) {
        ("", "connection_end") => format!(
            "closed {}/{} pkts {}/{} bytes",
            ev.packets_out, ev.packets_in, ev.bytes_out, ev.bytes_in
        ),
        ("", _) if !ev.policy.is_empty() => format!("{} ({})", ev.kind, ev.policy),
        ("", _) => ev.kind.clone(),
        (r, _) if !ev.policy_direction.is_empty() => {
            format!("{r} ({} {})", ev.policy, ev.policy_direction)
        }
        (r, _) => r.to_owned(),
    };
    format!(
        "{:<24} {:<9} {:<10} {:<6} {} -> {}  {}",
        rfc3339(ev.time_unix_ns),
        ev.node,
        ev.verdict,
        ev.protocol,
        endpoint(&ev.src_pod, &ev.src_ip, ev.src_port),
        dst,
        reason
    )
}

#[cfg(test)]
mod format_tests {
    use super::*;

    #[test]
    fn durations_and_times() {
        assert_eq!(parse_duration("30s").unwrap().as_secs(), 30);
        assert_eq!(parse_duration("5m").unwrap().as_secs(), 300);
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_795_000_000_123_000_000),
            "2026-11-18T11:06:40.123Z"
        );
    }

    #[test]
    fn table_row_shows_backend_and_reason() {
        let ev = FlowEvent {
            verdict: "DROPPED".into(),
            drop_reason: "policy_denied_ingress".into(),
            policy: "default-deny".into(),
            policy_direction: "ingress".into(),
            src_pod: "default/a".into(),
            src_port: 4000,
            dst_ip: "10.96.0.10".into(),
            dst_port: 80,
            backend_ip: "10.244.1.3".into(),
            backend_port: 8080,
            ..Default::default()
        };
        let row = to_table_row(&ev);
        assert!(
            row.contains("default/a:4000 -> 10.96.0.10:80 => 10.244.1.3:8080"),
            "{row}"
        );
        assert!(row.contains("policy_denied_ingress (default-deny ingress)"));
    }
}
