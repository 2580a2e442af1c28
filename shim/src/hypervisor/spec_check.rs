//! The checks a pod VM's spec passes before anything is started for it: each bad value is
//! refused with its name, rather than failing later in QEMU or husk-vmm.

use std::fs;

use super::{pod_vm::LaunchError, VmSpec};

pub(super) fn validate(spec: &VmSpec) -> Result<(), LaunchError> {
    let bad = |m: String| Err(LaunchError::InvalidSpec(m));
    for (what, p) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
        match fs::metadata(p) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return bad(format!("{what} {} is not a file", p.display())),
            Err(e) => return bad(format!("{what} {}: {e}", p.display())),
        }
    }
    if spec.vcpus == 0 || spec.vcpus > 64 {
        return bad(format!("vcpus must be 1..=64, got {}", spec.vcpus));
    }
    if spec.memory_mib < 64 {
        return bad(format!(
            "memory must be at least 64 MiB, got {}",
            spec.memory_mib
        ));
    }
    if spec.guest_cid < 3 {
        return bad(format!(
            "guest CID must be 3 or more, got {}",
            spec.guest_cid
        ));
    }
    if let Some(share) = &spec.share {
        let tag_ok = !share.tag.is_empty()
            && share.tag.len() <= 36
            && share
                .tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !tag_ok {
            return bad(format!(
                "share tag {:?} must be 1-36 bytes of [A-Za-z0-9._-]",
                share.tag
            ));
        }
        if !share.dir.is_dir() {
            return bad(format!(
                "shared directory {} is not a directory",
                share.dir.display()
            ));
        }
    }
    if spec.id.is_empty()
        || !spec
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return bad(format!("id {:?} must be non-empty [A-Za-z0-9._-]", spec.id));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use super::*;

    #[test]
    fn specs_with_bad_values_are_rejected_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        fs::write(&k, b"x").unwrap();
        let mut s = VmSpec::new("ok", k.clone(), k.clone(), dir.path().join("state"));
        assert!(validate(&s).is_ok());
        s.vcpus = 0;
        assert!(validate(&s).unwrap_err().to_string().contains("vcpus"));
        s.vcpus = 1;
        s.memory_mib = 8;
        assert!(validate(&s).unwrap_err().to_string().contains("memory"));
        s.memory_mib = 256;
        s.initrd = dir.path().join("missing");
        assert!(validate(&s).unwrap_err().to_string().contains("initrd"));
        s.initrd = k;
        s.id = "a/b".into();
        assert!(validate(&s).unwrap_err().to_string().contains("id"));
    }
}
