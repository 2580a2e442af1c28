//! Writes a root filesystem as a single-layer OCI image archive (an OCI
//! image layout in a tar), which `ctr image import` loads into containerd.
//! Lets the tests use a busybox image without any registry.

use std::{fs, io::Write, path::Path};

use anyhow::{Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

const MT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Archives `rootfs` as image `name` (e.g. `docker.io/library/busybox:husk`) to `out`.
pub fn write_oci_archive(rootfs: &Path, name: &str, out: &Path) -> Result<()> {
    write_oci_archive_with_cmd(rootfs, name, &["sh"], out)
}

/// As [`write_oci_archive`], with `cmd` as the image's default command.
pub fn write_oci_archive_with_cmd(
    rootfs: &Path,
    name: &str,
    cmd: &[&str],
    out: &Path,
) -> Result<()> {
    let mut layer = tar::Builder::new(Vec::new());
    // Keep applet symlinks as symlinks.
    layer.follow_symlinks(false);
    layer.mode(tar::HeaderMode::Deterministic);
    layer
        .append_dir_all(".", rootfs)
        .with_context(|| format!("archiving {}", rootfs.display()))?;
    let layer = layer.into_inner()?;
    let layer_digest = sha256(&layer);

    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
            "WorkingDir": "/"
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        "history": [{ "created_by": "husk tests: busybox-static" }]
    }))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": { "mediaType": MT_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": MT_LAYER, "digest": layer_digest, "size": layer.len() }]
    }))?;
    let manifest_digest = sha256(&manifest);
    let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MT_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag
            }
        }]
    }))?;

    let mut archive = tar::Builder::new(Vec::new());
    let mut add = |path: String, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        archive.append_data(&mut h, path, data)?;
        Ok(())
    };
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json".into(), &index)?;
    for (digest, data) in [
        (&layer_digest, &layer),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ] {
        let hex = digest.trim_start_matches("sha256:");
        add(format!("blobs/sha256/{hex}"), data)?;
    }
    let bytes = archive.into_inner()?;
    let mut f = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    f.write_all(&bytes)?;
    Ok(())
}
