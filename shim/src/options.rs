//! containerd's runtime options for non-runc runtimes: `runtimeoptions.v1.Options`
//! (`type_url = 1`, `config_path = 2`), what CRI builds from a runtime's
//! `ConfigPath` option and `ctr run --runtime-config-path` sends. The protos
//! crate does not ship this message; protobuf reads it as the unknown fields
//! of an empty message, so no wire format is decoded here.

use std::path::PathBuf;

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::{Message, UnknownValueRef};

const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";
const CONFIG_PATH_FIELD: u32 = 2;

/// The `ConfigPath` in the options, if they are runtimeoptions and name one.
pub fn config_path(options: Option<&Any>) -> Option<PathBuf> {
    let any = options?;
    if !any.type_url.ends_with(RUNTIME_OPTIONS) {
        return None;
    }
    let fields = Empty::parse_from_bytes(&any.value).ok()?;
    // The last occurrence wins, as protobuf's own decoding of the field would have it.
    let Some(UnknownValueRef::LengthDelimited(bytes)) = fields
        .special_fields
        .unknown_fields()
        .get(CONFIG_PATH_FIELD)
    else {
        return None;
    };
    let path = std::str::from_utf8(bytes).ok()?;
    (!path.is_empty()).then(|| PathBuf::from(path))
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
        let twice = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: encode(&[(2, "/a"), (2, "/b")]),
            ..Default::default()
        };
        assert_eq!(config_path(Some(&twice)), Some(PathBuf::from("/b")));
    }
}
