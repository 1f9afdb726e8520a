use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::Context as _;
use revirt::inspect::commands::{argument_words, completion_words, Flow};
use revirt::inspect::{interrupt, parse, Error, Options, Session};
use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::{FileHistory, History};
use rustyline::validate::Validator;
use rustyline::{CompletionType, Config, Editor, Helper};

#[derive(clap::Args)]
pub struct Args {
    /// Work on a recording that fails its integrity check (damaged
    /// evidence): say what is damaged, then go on.
    #[arg(long)]
    force: bool,
    /// Recording directory (made by `revirt record`).
    recording: PathBuf,
    /// Start at this point: exit:N, ckpt:K, event:I (just before event I), start, end (default: checkpoint 0).
    #[arg(long)]
    at: Option<String>,
    /// Run these commands (separated by ';') and exit instead of starting the REPL; may be repeated.
    /// Exit status 1 if any command failed.
    #[arg(short = 'c', long = "command")]
    commands: Vec<String>,
    /// Never replay through KVM: only the states at checkpoints (read from their files) can be examined.
    #[arg(long)]
    no_kvm: bool,
}

pub fn main(a: Args) -> anyhow::Result<u8> {
    let mut s = Session::open(&a.recording, Options { no_kvm: a.no_kvm, progress: true, force: a.force })?;
    // Ctrl-C stops long replays, not the inspector.
    interrupt::install();
    if let Some(at) = &a.at {
        s.seek(parse::point(at)?).with_context(|| format!("--at {at}"))?;
    }
    if !a.commands.is_empty() {
        return Ok(script(&mut s, &a.commands.join(";")));
    }
    if std::io::stdin().is_terminal() {
        return repl(&mut s);
    }
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text).context("reading commands from stdin")?;
    Ok(script(&mut s, &text))
}

/// Runs commands non-interactively; errors go to stderr and make the status 1.
fn script(s: &mut Session, text: &str) -> u8 {
    let mut failed = false;
    let mut out = std::io::stdout();
    for cmd in parse::split_commands(text) {
        match s.exec(&cmd, &mut out) {
            Ok(Flow::Quit) => break,
            Ok(Flow::Continue) => {}
            Err(e) => {
                let _ = out.flush();
                eprintln!("error: {cmd}: {e}");
                failed = true;
            }
        }
    }
    let _ = out.flush();
    u8::from(failed)
}

/// ~/.revirt_history, or $XDG_STATE_HOME/revirt/history when that is set.
fn history_path() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        let dir = PathBuf::from(x).join("revirt");
        let _ = std::fs::create_dir_all(&dir);
        return Some(dir.join("history"));
    }
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".revirt_history"))
}

/// Tab completion: command names, then a few known second words.
struct ReplHelper;

impl Completer for ReplHelper {
    type Candidate = String;

    fn complete(&self, line: &str, pos: usize, _: &rustyline::Context<'_>) -> rustyline::Result<(usize, Vec<String>)> {
        let before = &line[..pos];
        let start = before.rfind(char::is_whitespace).map(|i| i + 1).unwrap_or(0);
        let word = &before[start..];
        let first = before[..start].split_whitespace().collect::<Vec<_>>();
        let pool: Vec<&str> = match first.as_slice() {
            [] => completion_words(),
            [cmd] if matches!(*cmd, "help" | "h" | "?") => completion_words(),
            [cmd] => argument_words(cmd).to_vec(),
            _ => vec![],
        };
        let mut c: Vec<String> = pool.into_iter().filter(|w| w.starts_with(word)).map(str::to_string).collect();
        if let [only] = c.as_mut_slice() {
            if !only.ends_with(':') {
                only.push(' ');
            }
        }
        Ok((start, c))
    }
}

impl Hinter for ReplHelper {
    type Hint = String;
}
impl Highlighter for ReplHelper {}
impl Validator for ReplHelper {}
impl Helper for ReplHelper {}

fn repl(s: &mut Session) -> anyhow::Result<u8> {
    let config = Config::builder()
        .completion_type(CompletionType::List)
        .history_ignore_dups(true)?
        .history_ignore_space(true)
        .max_history_size(10_000)?
        .build();
    let mut rl: Editor<ReplHelper, FileHistory> = Editor::with_config(config)?;
    rl.set_helper(Some(ReplHelper));
    let hist = history_path();
    if let Some(h) = &hist {
        if h.exists() {
            if let Err(e) = rl.load_history(h) {
                eprintln!("revirt: warning: cannot read history {}: {e}", h.display());
            }
        }
    }
    println!(
        "revirt inspect {}: {} events, exits {}..{}; at {}.\n`help` lists the commands; Tab completes; Ctrl-D quits.",
        s.rec.dir.display(),
        s.rec.events.len(),
        s.rec.checkpoints[0].1,
        s.end_exits(),
        s.describe_here()
    );
    let mut out = std::io::stdout();
    loop {
        let prompt = format!("(revirt @{}) ", s.label());
        match rl.readline(&prompt) {
            Ok(line) => {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let _ = rl.add_history_entry(line);
                if let Some(h) = &hist {
                    if let Err(e) = rl.history_mut().save(h) {
                        eprintln!("revirt: warning: cannot write history {}: {e}", h.display());
                    }
                }
                for cmd in parse::split_commands(line) {
                    match s.exec(&cmd, &mut out) {
                        Ok(Flow::Quit) => return Ok(0),
                        Ok(Flow::Continue) => {}
                        Err(Error::Interrupted { at }) => {
                            let _ = out.flush();
                            eprintln!("interrupted; now at exit {at}");
                            break;
                        }
                        Err(e) => {
                            let _ = out.flush();
                            eprintln!("error: {e}");
                        }
                    }
                }
                let _ = out.flush();
            }
            Err(ReadlineError::Interrupted) => {
                println!("(Ctrl-C: `quit` or Ctrl-D leaves)");
            }
            Err(ReadlineError::Eof) => return Ok(0),
            Err(e) => return Err(e.into()),
        }
    }
}
