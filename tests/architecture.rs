//! The layering of docs/architecture.md, checked on the source: each
//! top-level module of src/ may name only the modules below it, so there are
//! no cycles, and the front ends (gdb/, inspect/) reach the machine only
//! through replay's API: no vmm, no KVM crates, no timeline internals.
//! And one module owns the recording's bytes: outside trace/ nothing names
//! a recording file or decodes a log chunk, checkpoint or machine state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom up: every module and the modules it may use.
const LAYERS: &[(&str, &[&str])] = &[
    ("vmm", &[]),
    ("clock", &["vmm"]),
    ("trace", &["vmm", "clock"]),
    ("record", &["vmm", "clock", "trace"]),
    ("replay", &["vmm", "clock", "trace", "record"]),
    ("migrate", &["vmm", "clock", "trace", "record"]),
    ("doctor", &["vmm", "clock"]),
    ("gdb", &["clock", "replay"]),
    ("inspect", &["clock", "trace", "replay"]),
];

/// Front ends: what they must not name.
const FRONT_ENDS: &[&str] = &["gdb", "inspect"];
const BELOW_REPLAY: &[&str] = &["crate::vmm", "kvm_bindings", "kvm_ioctls", "vm_memory", ".machine.", ".machine)", "tl.host", ".tl.host"];

/// What only trace/ may name: the recording's file names (through
/// `trace::Dir` everywhere else) and the codecs of its bytes (others call
/// trace's readers and writers). Identifiers match as whole words; string
/// literals with their quotes.
const FORMAT_ONLY: &[&str] = &[
    // File names, as literals or as trace's constants.
    "\"meta.json\"", "\"events.log\"", "\"console.log\"", "\"image.elf\"", "\"disk.img\"", ".ckpt\"", "\".ckpt", ".thin\"", "\"thin\"",
    "\"checkpoints/", "\"partial\"", ".partial\"", "\"events.idx\"", "INDEX", "META", "IMAGE", "DISK", "EVENTS", "CONSOLE", "CHECKPOINTS", "checkpoint_path", "write_atomic",
    // The codecs: log chunks, checkpoint and snapshot files, the machine-state container.
    "FILE_MAGIC", "encode_chunk", "LogReader::parse", "Checkpoint::parse", "checkpoint::encode", "snapshot::encode", "snapshot::parse",
    "state::seal", "state::open", "state::encode", "state::decode", "MachineStateV1",
    // Decoders that would read those bytes by hand (trace::decompress_exact,
    // the bounded one, is for anyone's own data, e.g. migration's wire blobs).
    "postcard", "bincode", "zstd::decode_all", "zstd::stream", "zstd::Decoder", "bulk::decompress", "Decompressor", "DCtx", "RVCKPT", "RVLOG", "RVIDX", "RVSNAP", "RVSTATE",
];

/// The needles of FORMAT_ONLY that `code` contains.
fn format_leaks(code: &str) -> Vec<&'static str> {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    FORMAT_ONLY
        .iter()
        .copied()
        .filter(|n| {
            let ident = n.chars().all(|c| c.is_alphanumeric() || c == '_' || c == ':');
            code.match_indices(n).any(|(i, _)| {
                !ident || (!word(code[..i].chars().next_back()) && !word(code[i + n.len()..].chars().next()))
            })
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source of a module without comment lines (doc links may name anything).
fn code_of(module: &str) -> Vec<(PathBuf, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let dir = src.join(module);
    if dir.is_dir() {
        rust_files(&dir, &mut files);
    } else {
        files.push(src.join(format!("{module}.rs")));
    }
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            let code: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect();
            (f, code.join("\n"))
        })
        .collect()
}

/// The modules of src/ that `module` names as `crate::X`, with one place each.
fn uses(module: &str) -> BTreeMap<String, String> {
    let names: BTreeSet<&str> = LAYERS.iter().map(|l| l.0).collect();
    let mut found = BTreeMap::new();
    for (file, code) in code_of(module) {
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + 7..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if name != module && names.contains(name.as_str()) {
                found.entry(name).or_insert_with(|| file.display().to_string());
            }
        }
    }
    found
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let mut bad = Vec::new();
    for (module, allowed) in LAYERS {
        for (used, at) in uses(module) {
            if !allowed.contains(&used.as_str()) {
                bad.push(format!("{module} uses {used} ({at})"));
            }
        }
    }
    assert!(bad.is_empty(), "layering broken (docs/architecture.md):\n  {}", bad.join("\n  "));
}

#[test]
fn the_layer_table_has_no_cycles_and_covers_src() {
    // Allowed uses only point to modules listed earlier: a DAG.
    for (i, (module, allowed)) in LAYERS.iter().enumerate() {
        for a in *allowed {
            let j = LAYERS.iter().position(|l| l.0 == *a).unwrap_or_else(|| panic!("{module} allows unknown {a}"));
            assert!(j < i, "{module} may use {a}, which is not below it");
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_str().unwrap().to_string();
        if ["lib", "main", "cli"].contains(&name.as_str()) {
            continue;
        }
        assert!(LAYERS.iter().any(|l| l.0 == name), "src/{name} is in no layer of tests/architecture.rs");
    }
}

#[test]
fn front_ends_reach_the_machine_only_through_replay() {
    let mut bad = Vec::new();
    for m in FRONT_ENDS {
        for (file, code) in code_of(m) {
            for needle in BELOW_REPLAY {
                if code.contains(needle) {
                    bad.push(format!("{} names {needle}", file.display()));
                }
            }
        }
    }
    assert!(bad.is_empty(), "front ends must use replay's API:\n  {}", bad.join("\n  "));
}

#[test]
fn only_trace_names_recording_files_or_decodes_their_bytes() {
    let mut bad = Vec::new();
    let modules = LAYERS.iter().map(|l| l.0).chain(["cli", "main", "lib"]).filter(|m| *m != "trace");
    for m in modules {
        for (file, code) in code_of(m) {
            for needle in format_leaks(&code) {
                bad.push(format!("{} names {needle}", file.display()));
            }
        }
    }
    assert!(bad.is_empty(), "only trace/ knows the recording's files and bytes (use trace::Dir and trace's readers):\n  {}", bad.join("\n  "));
}

#[test]
fn the_check_sees_a_forbidden_use() {
    // The scanner itself: a file that names the machine is caught.
    let code = "use crate::vmm::Machine;\nfn f(tl: &T) { tl.machine.vcpu; }";
    assert!(BELOW_REPLAY.iter().any(|n| code.contains(n)));
    let uses_vmm = code.match_indices("crate::").any(|(i, _)| code[i + 7..].starts_with("vmm"));
    assert!(uses_vmm);
    // A file name, a constant imported from trace, a hand-rolled decoder.
    assert_eq!(format_leaks(r#"let p = dir.join("events.log");"#), ["\"events.log\""]);
    assert_eq!(format_leaks("use crate::trace::{META, Dir};\nlet p = root.join(META);"), ["META"]);
    assert_eq!(format_leaks("let c = trace::Checkpoint::parse(&b, None)?;"), ["Checkpoint::parse"]);
    assert_eq!(format_leaks("let v = zstd::decode_all(&b[8..])?;"), ["zstd::decode_all"]);
    // Words that merely contain a name are not uses.
    assert!(format_leaks("const MAX_DISK_BYTES: u64 = 1; let x = \"writing console.log\";").is_empty());
}
