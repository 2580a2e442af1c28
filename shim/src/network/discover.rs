//! What the CNI plugins left in the pod's network namespace, read from
//! iproute2's JSON output (`ip -j addr`, `ip -j route`): the interface the
//! pod IP is on, its addresses, MTU and MAC, and the routes through it.
//!
//! Parsing is kept apart from running `ip` so it is tested without root.

use serde_json::Value;

/// The pod's interface as CNI configured it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniInterface {
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// (address, prefix length); link-local IPv6 left out (the guest makes its own).
    pub addresses: Vec<(String, u32)>,
}

/// A route the guest must be given (the kernel makes the subnet routes of
/// its addresses itself, so `proto kernel` routes are not here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniRoute {
    /// CIDR, or empty for the default route.
    pub destination: String,
    pub gateway: String,
}

/// The interface to hand to the guest: `preferred` (CRI's "eth0") if it is
/// there, else the one Ethernet interface with an address. `None` when the
/// namespace has no such interface (a pod without networking).
pub fn pick_interface(ip_addr_json: &str, preferred: &str) -> Result<Option<CniInterface>, String> {
    let v: Value =
        serde_json::from_str(ip_addr_json).map_err(|e| format!("parsing `ip -j addr`: {e}"))?;
    let links = v.as_array().ok_or("`ip -j addr` did not print an array")?;
    let candidates: Vec<&Value> = links
        .iter()
        .filter(|l| l.get("link_type").and_then(Value::as_str) == Some("ether"))
        .collect();
    let chosen = candidates
        .iter()
        .find(|l| l.get("ifname").and_then(Value::as_str) == Some(preferred))
        .or_else(|| {
            candidates.iter().find(|l| {
                l.get("addr_info")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty())
            })
        });
    let Some(link) = chosen else {
        return Ok(None);
    };
    let name = link
        .get("ifname")
        .and_then(Value::as_str)
        .ok_or("interface without a name")?
        .to_string();
    let mac_text = link
        .get("address")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{name} has no MAC address"))?;
    let mac = parse_mac(mac_text).ok_or_else(|| format!("{name}: bad MAC {mac_text:?}"))?;
    let mtu = link
        .get("mtu")
        .and_then(Value::as_u64)
        .and_then(|m| u32::try_from(m).ok())
        .unwrap_or(1500);
    let mut addresses = Vec::new();
    for a in link
        .get("addr_info")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let family = a.get("family").and_then(Value::as_str).unwrap_or_default();
        if family != "inet" && family != "inet6" {
            continue;
        }
        if a.get("scope").and_then(Value::as_str) == Some("link") {
            continue;
        }
        let (Some(local), Some(prefix)) = (
            a.get("local").and_then(Value::as_str),
            a.get("prefixlen").and_then(Value::as_u64),
        ) else {
            continue;
        };
        addresses.push((local.to_string(), prefix as u32));
    }
    Ok(Some(CniInterface {
        name,
        mac,
        mtu,
        addresses,
    }))
}

/// Routes through `dev` from `ip -j route` (either family), in order.
pub fn routes_via(ip_route_json: &str, dev: &str) -> Result<Vec<CniRoute>, String> {
    let v: Value =
        serde_json::from_str(ip_route_json).map_err(|e| format!("parsing `ip -j route`: {e}"))?;
    let mut out = Vec::new();
    for r in v.as_array().ok_or("`ip -j route` did not print an array")? {
        if r.get("dev").and_then(Value::as_str) != Some(dev) {
            continue;
        }
        if r.get("protocol").and_then(Value::as_str) == Some("kernel") {
            continue;
        }
        // Only unicast routes (iproute2 names the type of the others).
        if r.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t != "unicast")
        {
            continue;
        }
        let dst = r.get("dst").and_then(Value::as_str).unwrap_or("default");
        out.push(CniRoute {
            destination: if dst == "default" {
                String::new()
            } else {
                dst.to_string()
            },
            gateway: r
                .get("gateway")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        });
    }
    // Link routes first: a gateway must be reachable when its route is added.
    out.sort_by_key(|r| !r.gateway.is_empty());
    Ok(out)
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    s.parse::<macaddr::MacAddr6>()
        .ok()
        .map(macaddr::MacAddr6::into_array)
}

/// `aa:bb:cc:dd:ee:ff` as the kernel and CNI write it.
pub fn format_mac(m: [u8; 6]) -> String {
    macaddr::MacAddr6::from(m).to_string().to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR: &str = r#"[
      {"ifindex":1,"ifname":"lo","mtu":65536,"link_type":"loopback","address":"00:00:00:00:00:00",
       "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
      {"ifindex":3,"ifname":"eth0","link_index":7,"mtu":1450,"link_type":"ether","address":"0a:58:0a:cb:01:05",
       "addr_info":[{"family":"inet","local":"10.203.1.5","prefixlen":24,"scope":"global"},
                    {"family":"inet6","local":"fe80::858:aff:fecb:105","prefixlen":64,"scope":"link"}]}
    ]"#;

    #[test]
    fn picks_cni_eth0_with_its_addresses() {
        let i = pick_interface(ADDR, "eth0").unwrap().unwrap();
        assert_eq!(i.name, "eth0");
        assert_eq!(i.mac, [0x0a, 0x58, 0x0a, 0xcb, 0x01, 0x05]);
        assert_eq!(i.mtu, 1450);
        assert_eq!(i.addresses, vec![("10.203.1.5".to_string(), 24)]);
        // Another name: the Ethernet interface with an address.
        assert_eq!(pick_interface(ADDR, "net1").unwrap().unwrap().name, "eth0");
    }

    #[test]
    fn no_ethernet_interface_means_no_network() {
        let lo_only = r#"[{"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00","addr_info":[]}]"#;
        assert_eq!(pick_interface(lo_only, "eth0").unwrap(), None);
        assert!(pick_interface("not json", "eth0").is_err());
    }

    #[test]
    fn routes_skip_kernel_and_other_devices() {
        let routes = r#"[
          {"dst":"default","gateway":"10.203.1.1","dev":"eth0","flags":[]},
          {"dst":"10.203.1.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.203.1.5"},
          {"dst":"10.9.0.0/16","dev":"eth0","scope":"link"},
          {"dst":"10.8.0.0/16","gateway":"10.9.0.1","dev":"eth1"},
          {"type":"multicast","dst":"ff00::/8","dev":"eth0"}
        ]"#;
        let r = routes_via(routes, "eth0").unwrap();
        assert_eq!(
            r,
            vec![
                CniRoute {
                    destination: "10.9.0.0/16".into(),
                    gateway: String::new()
                },
                CniRoute {
                    destination: String::new(),
                    gateway: "10.203.1.1".into()
                },
            ]
        );
    }

    #[test]
    fn macs_round_trip() {
        let m = parse_mac("0A:58:0a:cb:01:05").unwrap();
        assert_eq!(format_mac(m), "0a:58:0a:cb:01:05");
        assert_eq!(parse_mac("0a:58:0a:cb:01"), None);
        assert_eq!(parse_mac("0a:58:0a:cb:01:05:06"), None);
    }
}
