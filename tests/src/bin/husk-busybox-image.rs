//! Writes the busybox OCI image archive the demo and the tests import:
//! `husk-busybox-image <out.tar>` (image name docker.io/library/busybox:husk).

use std::path::PathBuf;

use anyhow::{Context, Result};
use husk_tests::{
    husk_containerd::IMAGE, oci_image::write_oci_archive, rootfs::build_busybox_rootfs,
};

fn main() -> Result<()> {
    let out: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .context("usage: husk-busybox-image <out.tar>")?;
    let tmp = tempfile::tempdir()?;
    let rootfs = build_busybox_rootfs(&tmp.path().join("rootfs"))?;
    write_oci_archive(&rootfs, IMAGE, &out)?;
    println!("{IMAGE} -> {}", out.display());
    Ok(())
}
