//! Builds the bundled demo guest (guests/demo) with the machine's gcc and
//! binutils, so that `cargo build` alone yields a runnable guest image at
//! guests/demo/out/vm.img. The guest Makefile is incremental.
use std::path::Path;
use std::process::Command;

fn main() {
    // Read at run time: a build script binary reused from another checkout
    // (shared target dir) must not build that checkout's guest.
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&root).join("guests/demo");
    // Watch the sources, not the directory: out/ lives inside it. The demo's
    // kernel side is the guest SDK's runtime (guests/sdk/rt).
    for src in [dir.clone(), Path::new(&root).join("guests/sdk/rt")] {
        if let Ok(entries) = std::fs::read_dir(&src) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                    println!("cargo:rerun-if-changed={}", e.path().display());
                }
            }
        }
    }
    if !dir.join("Makefile").exists() {
        println!("cargo:warning=guests/demo/Makefile missing; demo guest not built");
        return;
    }
    let status = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&dir)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("building the demo guest failed ({s}); run `make -C guests/demo` to see why"),
        Err(e) => panic!("cannot run make to build the demo guest: {e} (install make and gcc)"),
    }
}
