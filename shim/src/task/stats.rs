//! The agent's cgroup v2 statistics as containerd's `io.containerd.cgroups.v2.Metrics`
//! (what `ctr task metrics` and CRI's stats decode).

use containerd_shim_protos::{
    cgroups_v2::metrics::{CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat},
    protobuf::{well_known_types::any::Any, MessageFull},
};
use husk_protocol::agent::StatsContainerResponse;

pub fn to_metrics(s: &StatsContainerResponse) -> Metrics {
    let mut m = Metrics::new();
    if let Some(cpu) = s.cpu.as_ref() {
        m.cpu = Some(CPUStat {
            usage_usec: cpu.usage_ns / 1000,
            user_usec: cpu.user_ns / 1000,
            system_usec: cpu.system_ns / 1000,
            ..Default::default()
        })
        .into();
    }
    if let Some(mem) = s.memory.as_ref() {
        m.memory = Some(MemoryStat {
            usage: mem.usage_bytes,
            usage_limit: mem.limit_bytes,
            max_usage: mem.max_usage_bytes,
            ..Default::default()
        })
        .into();
        m.memory_events = Some(MemoryEvents {
            oom_kill: mem.oom_kill_count,
            ..Default::default()
        })
        .into();
    }
    if let Some(p) = s.pids.as_ref() {
        m.pids = Some(PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        })
        .into();
    }
    if let Some(io) = s.io.as_ref() {
        m.io = Some(IOStat {
            usage: vec![IOEntry {
                rbytes: io.read_bytes,
                wbytes: io.write_bytes,
                ..Default::default()
            }],
            ..Default::default()
        })
        .into();
    }
    m
}

/// Packs a message the way containerd's typeurl expects: the proto's full
/// name as the type URL.
pub fn to_any<M: MessageFull>(m: &M) -> Result<Any, containerd_shim_protos::protobuf::Error> {
    Ok(Any {
        type_url: M::descriptor().full_name().to_string(),
        value: m.write_to_bytes()?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_protocol::agent::{CpuStats, MemoryStats};

    #[test]
    fn stats_convert_and_pack() {
        let s = StatsContainerResponse {
            cpu: Some(CpuStats {
                usage_ns: 5_000_000,
                ..Default::default()
            })
            .into(),
            memory: Some(MemoryStats {
                usage_bytes: 4096,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let m = to_metrics(&s);
        assert_eq!(m.cpu.usage_usec, 5000);
        assert_eq!(m.memory.usage, 4096);
        let any = to_any(&m).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
    }
}
