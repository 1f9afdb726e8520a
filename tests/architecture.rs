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

// ---------------------------------------------------------------------------
// Size: issue 15 wants no file in src/ over 800 lines and no function over
// 100, so a reader finds one concept per file and one step per function.

const MAX_FILE_LINES: usize = 800;
const MAX_FN_LINES: usize = 100;

/// Files (fn "") and functions over the limits today, being split by their
/// owners: (path under src/, fn, its length now). An entry may not grow, and
/// must go once its file or function is within the limit, so the list only
/// shrinks.
const TOO_LONG: &[(&str, &str, usize)] = &[
];

fn char_at(c: &[char], i: usize) -> char {
    c.get(i).copied().unwrap_or('\0')
}

/// The index just past the block comment that starts at `i` (they nest).
fn skip_block_comment(c: &[char], mut i: usize) -> usize {
    let mut depth = 0;
    while i < c.len() {
        if c[i] == '/' && char_at(c, i + 1) == '*' {
            depth += 1;
            i += 2;
        } else if c[i] == '*' && char_at(c, i + 1) == '/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                break;
            }
        } else {
            i += 1;
        }
    }
    i
}

/// When a raw string (`r"`, `r#"`, `br#"` ...) starts at `i`: the prefix
/// length before its quote and its number of `#`.
fn raw_string_at(c: &[char], i: usize) -> Option<(usize, usize)> {
    if i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_') {
        return None;
    }
    let k = match (char_at(c, i), char_at(c, i + 1)) {
        ('r', _) => 1,
        ('b', 'r') => 2,
        _ => return None,
    };
    let hashes = (i + k..).take_while(|&j| char_at(c, j) == '#').count();
    (char_at(c, i + k + hashes) == '"').then_some((k + hashes, hashes))
}

/// The source with comments, string and char literals blanked out (their
/// newlines kept), so braces and `fn` inside them do not count.
fn blank_literals(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < c.len() {
        let start = i;
        if c[i] == '/' && char_at(&c, i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
            continue;
        } else if c[i] == '/' && char_at(&c, i + 1) == '*' {
            i = skip_block_comment(&c, i);
        } else if let Some((prefix, hashes)) = raw_string_at(&c, i) {
            i += prefix + 1;
            while i < c.len() && !(c[i] == '"' && (1..=hashes).all(|h| char_at(&c, i + h) == '#')) {
                i += 1;
            }
            i += 1 + hashes;
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c[i] == '\'' && (char_at(&c, i + 1) == '\\' || char_at(&c, i + 2) == '\'') {
            // A char literal ('x', '\n', '\u{1F600}'); otherwise a lifetime.
            i += if char_at(&c, i + 1) == '\\' { 3 } else { 1 };
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else {
            out.push(c[i]);
            i += 1;
            continue;
        }
        out.extend(c[start..i.min(c.len())].iter().filter(|&&x| x == '\n'));
        out.push(' ');
    }
    out
}

/// Every `fn` with a body in `src`: (name, first line, lines from its
/// `fn` line to its closing brace).
fn fn_lengths(src: &str) -> Vec<(String, usize, usize)> {
    let code = blank_literals(src);
    let b = code.as_bytes();
    let line_of = |pos: usize| code[..pos].matches('\n').count() + 1;
    let mut out = Vec::new();
    for (pos, _) in code.match_indices("fn ") {
        if pos > 0 && (b[pos - 1].is_ascii_alphanumeric() || b[pos - 1] == b'_') {
            continue;
        }
        let name: String = code[pos + 3..].trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if name.is_empty() {
            continue; // `fn(u8) -> u8`, a type
        }
        // The body is the first `{` outside parentheses and brackets; a `;`
        // first means a declaration without one.
        let mut depth = 0i32;
        let mut open = None;
        for (k, &ch) in b.iter().enumerate().skip(pos) {
            match ch {
                b'(' | b'[' => depth += 1,
                b')' | b']' => depth -= 1,
                b';' if depth == 0 => break,
                b'{' if depth == 0 => {
                    open = Some(k);
                    break;
                }
                _ => {}
            }
        }
        let Some(open) = open else { continue };
        let mut braces = 0i32;
        let close = b[open..].iter().position(|&ch| {
            braces += match ch {
                b'{' => 1,
                b'}' => -1,
                _ => 0,
            };
            braces == 0
        });
        let Some(close) = close else { continue };
        out.push((name, line_of(pos), line_of(open + close) - line_of(pos) + 1));
    }
    out
}

/// Every file and function of src/ over the limits: (path under src/, fn
/// or "" for the file, first line, lines).
fn too_long() -> Vec<(String, String, usize, usize)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut found = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().replace('\\', "/");
        let lines = text.lines().count();
        if lines > MAX_FILE_LINES {
            found.push((rel.clone(), String::new(), 1, lines));
        }
        for (name, line, n) in fn_lengths(&text) {
            if n > MAX_FN_LINES {
                found.push((rel.clone(), name, line, n));
            }
        }
    }
    found
}

#[test]
fn no_file_over_800_lines_and_no_function_over_100() {
    let found = too_long();
    let mut bad = Vec::new();
    for (file, name, line, n) in &found {
        let what = if name.is_empty() {
            format!("src/{file} is {n} lines (limit {MAX_FILE_LINES})")
        } else {
            format!("src/{file}:{line} fn {name} is {n} lines (limit {MAX_FN_LINES})")
        };
        match TOO_LONG.iter().find(|(f, fname, _)| f == file && fname == name) {
            None => bad.push(format!("{what}: split it")),
            Some((_, _, was)) if n > was => bad.push(format!("{what}, more than the {was} TOO_LONG allows: split it")),
            Some(_) => {}
        }
    }
    for (file, name, was) in TOO_LONG {
        if !found.iter().any(|(f, fname, _, _)| f == file && fname == name) {
            let what = if name.is_empty() { format!("src/{file}") } else { format!("src/{file} fn {name}") };
            bad.push(format!("{what} (was {was} lines) is within the limit now: remove it from TOO_LONG in tests/architecture.rs"));
        }
    }
    assert!(bad.is_empty(), "sizes (issue 15):\n  {}", bad.join("\n  "));
}

#[test]
fn the_size_check_counts_functions_not_literals() {
    let src = "fn a() {\n    let s = \"} fn b() {\";\n    // }\n    let c = '}';\n    let e = '\\'';\n    let r = r#\"{\"#;\n}\nfn b<'x>(v: &'x [u8; 2]) -> impl Fn() -> u8 + 'x {\n    /* { /* } */ */ move || v[0]\n}\ntrait T { fn c(&self); }\n";
    assert_eq!(fn_lengths(src), [("a".to_string(), 1, 7), ("b".to_string(), 8, 3)]);
    // Over the limit: found, with its place and length.
    let long = format!("fn f() {{\n{}}}\n", "    x();\n".repeat(MAX_FN_LINES));
    assert_eq!(fn_lengths(&long), [("f".to_string(), 1, MAX_FN_LINES + 2)]);
}
