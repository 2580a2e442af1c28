//! husk-mkinitrd: writes husk's guest initrd, a cpio (newc) archive whose
//! /init is the static husk-agent. The archive holds only what the kernel needs
//! before the agent runs (mount points and the console node); the agent mounts
//! everything else itself. Output is byte-for-byte reproducible.

use std::{fs, io::BufWriter, path::PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use husk_images::cpio::{self, Entry};

#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The husk-agent binary to install as /init (must be statically linked).
    #[arg(long)]
    agent: PathBuf,
    /// Where to write the initrd.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let agent =
        fs::read(&args.agent).with_context(|| format!("reading agent {}", args.agent.display()))?;
    if !agent.starts_with(b"\x7fELF") {
        bail!("--agent {}: not an ELF executable", args.agent.display());
    }
    if elf_has_interpreter(&agent) {
        bail!(
            "--agent {}: dynamically linked (has PT_INTERP); the initrd has no libc, build it with -C target-feature=+crt-static",
            args.agent.display()
        );
    }
    let dir = |p: &str| Entry::Dir {
        path: p.into(),
        mode: 0o755,
    };
    let entries = vec![
        Entry::File {
            path: "init".into(),
            mode: 0o755,
            data: agent,
        },
        dir("dev"),
        // The kernel opens /dev/console for init's stdio before anything is mounted.
        Entry::CharDev {
            path: "dev/console".into(),
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        Entry::CharDev {
            path: "dev/null".into(),
            mode: 0o666,
            major: 1,
            minor: 3,
        },
        dir("proc"),
        dir("sys"),
        dir("run"),
        dir("tmp"),
        dir("etc"),
        dir("mnt"),
        dir("root"),
    ];
    let tmp = args.out.with_extension("tmp");
    let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = BufWriter::new(file);
    let size = cpio::write_archive(&mut w, &entries)?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    fs::rename(&tmp, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("husk-mkinitrd: wrote {} ({size} bytes)", args.out.display());
    Ok(())
}

/// True when the ELF file has a PT_INTERP program header (a dynamic loader).
fn elf_has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let rd16 = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let rd32 = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let rd64 = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // 64-bit little-endian ELF only: that is the only kind husk's guest runs.
    let (Some(phoff), Some(phentsize), Some(phnum)) = (rd64(0x20), rd16(0x36), rd16(0x38)) else {
        return false;
    };
    (0..phnum).any(|i| {
        usize::try_from(phoff)
            .ok()
            .and_then(|off| off.checked_add(i * phentsize))
            .and_then(rd32)
            == Some(PT_INTERP)
    })
}
