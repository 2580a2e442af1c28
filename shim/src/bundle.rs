//! An OCI bundle as containerd hands it over: `config.json` (checked, with a
//! clear error for a malformed one) and the CRI annotations that say which
//! pod a container belongs to.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use serde_json::Value;

use crate::ids::{BadId, SandboxId};

/// `sandbox` for a pod's sandbox (pause) container, `container` otherwise.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The pod a CRI container belongs to.
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {bundle}: reading config.json: {source}")]
    Read {
        bundle: PathBuf,
        source: std::io::Error,
    },
    #[error("bundle {bundle}: config.json is not valid JSON: {message}")]
    Json { bundle: PathBuf, message: String },
    #[error("bundle {bundle}: config.json is not an OCI runtime spec: {message}")]
    Spec { bundle: PathBuf, message: String },
}

/// Where a container stands in its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRole {
    /// Boots the pod VM; the id is the sandbox's.
    Sandbox(SandboxId),
    /// Joins the VM of the named sandbox.
    Member(SandboxId),
}

impl PodRole {
    pub fn sandbox_id(&self) -> &SandboxId {
        match self {
            PodRole::Sandbox(id) | PodRole::Member(id) => id,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Bundle {
    pub path: PathBuf,
    /// config.json as containerd wrote it, passed to the agent unchanged.
    pub spec_json: Vec<u8>,
    pub annotations: HashMap<String, String>,
    pub hostname: String,
    /// `root.path`, resolved against the bundle.
    pub root: PathBuf,
}

impl Bundle {
    pub fn read(path: &Path) -> Result<Bundle, BundleError> {
        let bytes =
            std::fs::read(path.join("config.json")).map_err(|source| BundleError::Read {
                bundle: path.to_path_buf(),
                source,
            })?;
        Self::parse(path, bytes)
    }

    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Bundle, BundleError> {
        let spec_err = |message: String| BundleError::Spec {
            bundle: path.to_path_buf(),
            message,
        };
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| BundleError::Json {
            bundle: path.to_path_buf(),
            message: e.to_string(),
        })?;
        // The typed parse catches wrong types anywhere in the spec, with
        // serde's message naming the field.
        serde_json::from_value::<oci_spec::runtime::Spec>(v.clone())
            .map_err(|e| spec_err(e.to_string()))?;
        let args = v.pointer("/process/args").and_then(Value::as_array);
        match args {
            Some(a) if !a.is_empty() => {}
            Some(_) => return Err(spec_err("process.args is empty".into())),
            None => return Err(spec_err("process.args is missing".into())),
        }
        let root = v
            .pointer("/root/path")
            .and_then(Value::as_str)
            .ok_or_else(|| spec_err("root.path is missing".into()))?;
        let annotations = v
            .get("annotations")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Bundle {
            path: path.to_path_buf(),
            spec_json: bytes,
            annotations,
            hostname: v
                .get("hostname")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            root: path.join(root),
        })
    }

    pub fn role(&self, container_id: &str) -> Result<PodRole, BadId> {
        role(&self.annotations, container_id)
    }
}

/// A CRI container (`container-type: container`) with a sandbox id joins
/// that sandbox; everything else (a CRI sandbox, a plain `ctr run`
/// container) is a pod of its own. The id it names is checked here: it
/// names the pod's state directory.
pub fn role(annotations: &HashMap<String, String>, container_id: &str) -> Result<PodRole, BadId> {
    let kind = annotations.get(CRI_CONTAINER_TYPE).map(String::as_str);
    Ok(match (kind, annotations.get(CRI_SANDBOX_ID)) {
        (Some("container"), Some(sb)) if !sb.is_empty() && sb != container_id => {
            PodRole::Member(SandboxId::new(sb)?)
        }
        (Some("sandbox"), Some(sb)) if !sb.is_empty() => PodRole::Sandbox(SandboxId::new(sb)?),
        _ => PodRole::Sandbox(SandboxId::new(container_id)?),
    })
}

/// The sandbox id for a bundle that may be unreadable (shim `start` and
/// `delete`): its own id when config.json cannot tell.
pub fn sandbox_id_of(bundle: &Path, container_id: &str) -> Result<SandboxId, BadId> {
    match Bundle::read(bundle) {
        Ok(b) => Ok(b.role(container_id)?.sandbox_id().clone()),
        Err(_) => SandboxId::new(container_id),
    }
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use super::*;

    fn spec(extra: &str) -> Vec<u8> {
        format!(
            r#"{{"ociVersion":"1.0.2","process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}}},"root":{{"path":"rootfs"}}{extra}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn good_spec_parses_with_annotations() {
        let b = Bundle::parse(
            Path::new("/b"),
            spec(r#","hostname":"h","annotations":{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"sb"}"#),
        )
        .unwrap();
        assert_eq!(b.root, Path::new("/b/rootfs"));
        assert_eq!(b.hostname, "h");
        assert_eq!(b.role("c1").unwrap(), PodRole::Member(sid("sb")));
    }

    fn sid(s: &str) -> SandboxId {
        SandboxId::new(s).unwrap()
    }

    #[test]
    fn roles() {
        let mut a = HashMap::new();
        assert_eq!(role(&a, "x").unwrap(), PodRole::Sandbox(sid("x")));
        a.insert(CRI_CONTAINER_TYPE.to_string(), "sandbox".to_string());
        a.insert(CRI_SANDBOX_ID.to_string(), "x".to_string());
        assert_eq!(role(&a, "x").unwrap(), PodRole::Sandbox(sid("x")));
        a.insert(CRI_CONTAINER_TYPE.to_string(), "container".to_string());
        assert_eq!(role(&a, "y").unwrap(), PodRole::Member(sid("x")));
    }

    #[test]
    fn a_sandbox_id_that_is_a_path_is_refused() {
        let mut a = HashMap::new();
        a.insert(CRI_CONTAINER_TYPE.to_string(), "container".to_string());
        a.insert(CRI_SANDBOX_ID.to_string(), "../..".to_string());
        let e = role(&a, "c").unwrap_err().to_string();
        assert!(e.contains("\"../..\""), "{e}");
        assert!(role(&HashMap::new(), "a/b").is_err());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            spec(r#","annotations":{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"/"}"#),
        )
        .unwrap();
        assert!(sandbox_id_of(dir.path(), "c").is_err());
    }

    #[test]
    fn malformed_specs_get_clear_errors() {
        let p = Path::new("/b");
        let e = Bundle::parse(p, b"{not json".to_vec())
            .unwrap_err()
            .to_string();
        assert!(e.contains("/b") && e.contains("not valid JSON"), "{e}");
        let e = Bundle::parse(p, br#"{"ociVersion":"1.0.2","root":{"path":"r"}}"#.to_vec())
            .unwrap_err()
            .to_string();
        assert!(e.contains("process"), "{e}");
        let e = Bundle::parse(
            p,
            br#"{"ociVersion":"1.0.2","process":{"args":"sh","cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"r"}}"#.to_vec(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not an OCI runtime spec"), "{e}");
    }
}
