//! Guards the static build: libcontainer's seccomp support links libseccomp,
//! dynamically unless told otherwise, and a `+crt-static` build then quietly
//! yields a dynamically linked binary that cannot run as the initrd's /init.
//! Fail the build instead, saying what to set.

fn main() {
    println!("cargo:rerun-if-env-changed=LIBSECCOMP_LINK_TYPE");
    println!("cargo:rerun-if-env-changed=LIBSECCOMP_LIB_PATH");
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let crt_static = features.split(',').any(|f| f == "crt-static");
    let link_type = std::env::var("LIBSECCOMP_LINK_TYPE").unwrap_or_default();
    if crt_static && link_type != "static" {
        panic!(
            "husk-agent: a +crt-static build needs libseccomp linked statically too; set \
             LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
             (Debian's libseccomp-dev), otherwise the binary comes out dynamically linked"
        );
    }
}
