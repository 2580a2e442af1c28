//! `containerd-shim-husk-v2 start`: find or spawn the pod's shim and print
//! its address. `containerd-shim-husk-v2 delete`: clean up after a shim that
//! is gone.
//!
//! Both run with the container's bundle as working directory. Containers are
//! grouped by sandbox id (the CRI annotations in config.json), so every
//! container of a pod reaches the one shim, and the one VM, of that pod.

use std::{
    io::{IsTerminal, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use containerd_shim::{api::DeleteResponse, Error, Flags, StartOpts};
use containerd_shim_protos::protobuf::{well_known_types::any::Any, Message};
use tracing::{info, warn};

use crate::{
    bundle,
    events::now,
    state::{self, Cleanup},
};

/// What containerd reports for a task whose shim died: SIGKILL.
const KILLED: u32 = 128 + 9;

/// The `start` action, run by the binary itself: containerd 1.6 reads a
/// bare address from stdout, while the containerd-shim crate's own `start`
/// answers in the JSON form of later containerd releases.
pub async fn start_command(flags: &Flags) -> Result<(), Error> {
    let mut options = Vec::new();
    if !std::io::stdin().is_terminal() {
        // containerd writes the runtime options (an Any) to stdin.
        std::io::stdin()
            .take(1 << 20)
            .read_to_end(&mut options)
            .map_err(|e| Error::Other(format!("reading start options from stdin: {e}")))?;
    }
    let extensions = Any::parse_from_bytes(&options)
        .ok()
        .filter(|a| !a.type_url.is_empty())
        .into_iter()
        .collect();
    let opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: flags.address.clone(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        extensions,
        ..Default::default()
    };
    let address = start(opts).await?;
    let mut out = std::io::stdout();
    out.write_all(address.as_bytes())
        .and_then(|_| out.flush())
        .map_err(|e| Error::Other(format!("writing the address: {e}")))
}

pub async fn start(opts: StartOpts) -> Result<String, Error> {
    let cwd =
        std::env::current_dir().map_err(|e| Error::Other(format!("working directory: {e}")))?;
    crate::ids::check("container", &opts.id).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let grouping = bundle::sandbox_id_of(&cwd, &opts.id)
        .map_err(|e| Error::InvalidArgument(format!("bundle {}: {e}", cwd.display())))?;
    let grouping = grouping.as_str().to_string();
    let address = opts.socket_address(&grouping);
    let path = address.strip_prefix("unix://").unwrap_or(&address);
    if grouping != opts.id && UnixStream::connect(path).is_ok() {
        // The pod's shim already runs: this container joins it.
        info!(id = %opts.id, sandbox = %grouping, "joining the pod's shim");
    } else {
        let spawned = containerd_shim::spawn(opts, &grouping, Vec::new()).await?;
        debug_assert_eq!(spawned, address);
    }
    if let Err(e) = std::fs::write("address", &address) {
        warn!("writing address file: {e}");
    }
    Ok(address)
}

/// The `delete` action: clean up, then print the DeleteResponse.
pub fn delete_command(flags: &Flags) -> Result<(), Error> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().unwrap_or_default()
    } else {
        flags.bundle.clone().into()
    };
    let resp = delete(&flags.id, &bundle);
    let bytes = resp.write_to_bytes()?;
    let mut out = std::io::stdout();
    out.write_all(&bytes)
        .and_then(|_| out.flush())
        .map_err(|e| Error::Other(format!("writing the delete response: {e}")))
}

/// Removes what a dead shim left: its VM processes, mounts and state
/// directory. Harmless when the shim (or nothing) is there.
pub fn delete(container_id: &str, bundle_dir: &Path) -> DeleteResponse {
    // An id that is not a plain name (`../..` in a CRI annotation) names no
    // sandbox directory: nothing of it is touched.
    match bundle::sandbox_id_of(bundle_dir, container_id) {
        Ok(sandbox) => clean_up(&sandbox),
        Err(e) => warn!(bundle = %bundle_dir.display(), "delete: {e}; nothing cleaned up"),
    }
    DeleteResponse {
        pid: 0,
        exit_status: KILLED,
        exited_at: Some(now()).into(),
        ..Default::default()
    }
}

fn clean_up(sandbox: &crate::ids::SandboxId) {
    match state::cleanup_sandbox(sandbox) {
        Ok(Cleanup::Removed) => info!(%sandbox, "cleaned up after a dead shim"),
        Ok(Cleanup::ShimAlive) => info!(%sandbox, "the pod's shim still runs; nothing to clean"),
        Ok(Cleanup::Nothing) => {}
        Err(e) => warn!(%sandbox, "cleaning up: {e}"),
    }
}
