//! Generates the agent API's Rust code from proto/ with the pure-Rust
//! ttrpc-codegen (no protoc needed on the build machine).
use std::{fs, io, path::Path};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() -> io::Result<()> {
    let out_dir = std::env::var("OUT_DIR").map_err(io::Error::other)?;
    let gen_dir = Path::new(&out_dir).join("generated");
    fs::create_dir_all(&gen_dir)?;
    let protos = ["proto/agent.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Codegen::new()
        .out_dir(&gen_dir)
        .inputs(protos)
        .include("proto")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .map_err(io::Error::other)?;

    // The generated files open with inner attributes (`#![...]`, `//!`), which
    // `include!` cannot take: strip them so lib.rs can include the files as
    // module bodies.
    for entry in fs::read_dir(&gen_dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let text = fs::read_to_string(&path)?;
        let cleaned: String = text
            .lines()
            .filter(|l| {
                let t = l.trim_start();
                !t.starts_with("#!") && !t.starts_with("//!")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write(&path, cleaned)?;
    }
    Ok(())
}
