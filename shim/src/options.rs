//! containerd's runtime options for non-runc runtimes: `runtimeoptions.v1.Options`
//! (`type_url = 1`, `config_path = 2`), what CRI builds from a runtime's
//! `ConfigPath` option and `ctr run --runtime-config-path` sends. The protos
//! crate does not ship this message, and it is two strings: decoded by hand.

use std::path::PathBuf;

use containerd_shim_protos::protobuf::well_known_types::any::Any;

const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";

/// The `ConfigPath` in the options, if they are runtimeoptions and name one.
pub fn config_path(options: Option<&Any>) -> Option<PathBuf> {
    let any = options?;
    if !any.type_url.ends_with(RUNTIME_OPTIONS) {
        return None;
    }
    let path = string_field(&any.value, 2)?;
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// The last occurrence of length-delimited field `field` as UTF-8.
fn string_field(mut buf: &[u8], field: u64) -> Option<String> {
    let mut found = None;
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let (num, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut buf)?;
            }
            1 => buf = buf.get(8..)?,
            5 => buf = buf.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut buf)?).ok()?;
                let bytes = buf.get(..len)?;
                if num == field {
                    found = Some(String::from_utf8(bytes.to_vec()).ok()?);
                }
                buf = &buf[len..];
            }
            _ => return None,
        }
    }
    found
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, s) in fields {
            out.push((n << 3) | 2);
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
        out
    }

    #[test]
    fn config_path_is_read_from_runtime_options() {
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: encode(&[(1, "x"), (2, "/etc/husk/other.toml")]),
            ..Default::default()
        };
        assert_eq!(
            config_path(Some(&any)),
            Some(PathBuf::from("/etc/husk/other.toml"))
        );
        let runc = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: encode(&[(2, "/x")]),
            ..Default::default()
        };
        assert_eq!(config_path(Some(&runc)), None);
        let broken = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: vec![0x12, 0x50],
            ..Default::default()
        };
        assert_eq!(config_path(Some(&broken)), None);
        assert_eq!(config_path(None), None);
    }
}
