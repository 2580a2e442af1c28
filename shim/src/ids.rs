//! Sandbox, container and exec ids, checked once where they enter the shim
//! (containerd's requests, the bundle's CRI annotations, the `delete` action)
//! and before any of them names a path, a cgroup or a state file.
//!
//! containerd's own rule is stricter in places and looser in others across
//! versions; this one is what is safe as a single path component: 1-128 bytes of
//! `[A-Za-z0-9_.-]`, and not `.` or `..`.

use std::fmt;

/// The longest id accepted (containerd's are at most 76, CRI's 64).
pub const MAX_ID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} id {id:?} is not valid: it must be 1-{MAX_ID_LEN} characters of [A-Za-z0-9_.-], and not \".\" or \"..\"")]
pub struct BadId {
    pub what: &'static str,
    pub id: String,
}

/// Checks `id` as a `what` id ("sandbox", "container", "exec").
pub fn check<'a>(what: &'static str, id: &'a str) -> Result<&'a str, BadId> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(id)
    } else {
        Err(BadId {
            what,
            id: id.chars().take(MAX_ID_LEN + 8).collect(),
        })
    }
}

/// A sandbox id that passed [`check`]: the only thing that names
/// `/run/husk/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SandboxId(String);

impl SandboxId {
    pub fn new(id: &str) -> Result<SandboxId, BadId> {
        check("sandbox", id).map(|id| SandboxId(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_like_ids_are_refused() {
        for bad in [
            "", ".", "..", "../..", "a/b", "/", "a\0b", "a b", "\u{e9}", "a\nb",
        ] {
            assert!(check("sandbox", bad).is_err(), "{bad:?}");
        }
        assert!(check("exec", &"x".repeat(MAX_ID_LEN + 1)).is_err());
        for good in [
            "abc",
            "a.b-c_d",
            "...",
            "0123456789abcdef",
            &"x".repeat(MAX_ID_LEN),
        ] {
            assert!(check("container", good).is_ok(), "{good:?}");
        }
        let e = SandboxId::new("../..").unwrap_err().to_string();
        assert!(e.contains("sandbox id \"../..\""), "{e}");
    }
}
