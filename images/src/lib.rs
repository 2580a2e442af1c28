//! Guest image builders. [`cpio`] writes the initrd archive.

pub mod cpio;
