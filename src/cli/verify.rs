use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Recording directory.
    recording: PathBuf,
    /// Print the recording's digest (publish it to detect a rewritten chain later).
    #[arg(long)]
    digest: bool,
    /// Check the recording against a digest published earlier.
    #[arg(long, value_name = "HEX")]
    expect: Option<String>,
    /// Show every file's hash that goes into the digest.
    #[arg(short, long)]
    verbose: bool,
}

/// Exit statuses: 0 intact (and digest matches), 1 damaged or digest mismatch, 2 incomplete.
pub fn main(a: Args) -> anyhow::Result<u8> {
    let r = revirt::trace::verify::verify(&a.recording);
    for f in &r.findings {
        println!("{} {}", if f.ok { "ok  " } else { "FAIL" }, f.what);
    }
    if a.verbose {
        for (name, sha) in &r.manifest {
            println!("     {sha}  {name}");
        }
    }
    if a.digest {
        println!("digest {}", r.digest.as_deref().unwrap_or("(unavailable: meta.json or events.log unreadable)"));
    }
    if let Some(want) = &a.expect {
        if r.digest.as_deref() != Some(want.trim()) {
            println!("FAIL digest differs from the published one: the recording was changed");
            return Ok(1);
        }
        println!("ok   digest matches the published one");
    }
    Ok(if r.intact {
        println!("recording intact");
        0
    } else if r.incomplete {
        println!("recording incomplete (cut short; what is there verifies)");
        2
    } else {
        println!("recording DAMAGED");
        1
    })
}
