//! The inspector's little languages: command lines, numbers, addresses,
//! points of a recording, search patterns.

use super::Error;

fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

/// Splits `a; b; "c;d"` into commands at semicolons outside double quotes.
pub fn split_commands(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut escaped) = (false, false);
    for c in s.chars() {
        match c {
            _ if escaped => {
                escaped = false;
                cur.push(c);
            }
            '\\' if quoted => {
                escaped = true;
                cur.push(c);
            }
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ';' | '\n' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().map(|c| c.trim().to_string()).filter(|c| !c.is_empty() && !c.starts_with('#')).collect()
}

/// A word of a command line; quoted words keep their bytes (escapes decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Word {
    Plain(String),
    Quoted(Vec<u8>),
}

impl Word {
    pub fn text(&self) -> String {
        match self {
            Word::Plain(s) => s.clone(),
            Word::Quoted(b) => String::from_utf8_lossy(b).into_owned(),
        }
    }
}

/// Splits a command line into words: whitespace separates, `"..."` quotes
/// (with `\n \t \r \0 \\ \" \xNN` escapes).
pub fn words(line: &str) -> Result<Vec<Word>, Error> {
    let mut out = Vec::new();
    let mut it = line.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let Some(&c) = it.peek() else { break };
        if c == '"' {
            it.next();
            let mut b = Vec::new();
            loop {
                match it.next() {
                    None => return Err(usage("unterminated string (missing closing \")")),
                    Some('"') => break,
                    Some('\\') => match it.next() {
                        Some('n') => b.push(b'\n'),
                        Some('t') => b.push(b'\t'),
                        Some('r') => b.push(b'\r'),
                        Some('0') => b.push(0),
                        Some('\\') => b.push(b'\\'),
                        Some('"') => b.push(b'"'),
                        Some('x') => {
                            let h: String = [it.next(), it.next()].iter().flatten().collect();
                            let v = u8::from_str_radix(&h, 16)
                                .map_err(|_| usage(format!("bad escape \\x{h} in string (want two hex digits)")))?;
                            b.push(v);
                        }
                        Some(o) => return Err(usage(format!("unknown escape \\{o} in string"))),
                        None => return Err(usage("unterminated string")),
                    },
                    Some(o) => {
                        let mut buf = [0u8; 4];
                        b.extend_from_slice(o.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
            out.push(Word::Quoted(b));
        } else {
            let mut s = String::new();
            while let Some(&c) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                s.push(c);
                it.next();
            }
            out.push(Word::Plain(s));
        }
    }
    Ok(out)
}

/// A number: `0x` hex, `0b` binary, else decimal; `_` separators allowed.
pub fn number(s: &str) -> Result<u64, Error> {
    let t = s.trim().replace('_', "");
    let r = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else if let Some(b) = t.strip_prefix("0b") {
        u64::from_str_radix(b, 2)
    } else {
        t.parse()
    };
    r.map_err(|_| usage(format!("'{s}' is not a number (decimal, or hex with 0x)")))
}

/// A point of the recording, as the user wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// After `n` guest-caused exits (and everything the log delivered at the n-th).
    Exit(u64),
    /// Relative to here, in exits.
    Rel(i64),
    /// Checkpoint `k`.
    Checkpoint(u32),
    /// Just before event `i` takes effect.
    Event(usize),
    Start,
    End,
    /// An exact instruction: `E:B:RIP` (exits, branches since, RIP), as `where` prints it.
    Exec(crate::clock::ExecPoint),
}

pub const POINT_HELP: &str = "POINT is exit:N (after N guest-caused exits; a bare N means the same), +N / -N (exits from here), \
ckpt:K (checkpoint K), event:I (just before event I takes effect), E:B:RIP (the instruction at RIP after B branches past exit E), \
start, or end";

pub fn point(s: &str) -> Result<Point, Error> {
    let t = s.trim();
    let bad = |what: &str| usage(format!("bad point '{s}': {what}. {POINT_HELP}"));
    let parts: Vec<&str> = t.trim_start_matches("exit:").split(':').collect();
    if let [e, b, r] = parts.as_slice() {
        let n = |x: &str| number(x).map_err(|_| bad(&format!("'{x}' is not a number")));
        return Ok(Point::Exec(crate::clock::ExecPoint { exits: n(e)?, branches: n(b)?, rip: n(r)? }));
    }
    let (kind, val) = match t.split_once(':') {
        Some((k, v)) => (k, v),
        None => match t {
            "start" | "begin" => return Ok(Point::Start),
            "end" => return Ok(Point::End),
            _ if t.starts_with('+') || t.starts_with('-') => {
                let n = number(&t[1..]).map_err(|_| bad("not a number of exits"))?;
                let n = i64::try_from(n).map_err(|_| bad("too large"))?;
                return Ok(Point::Rel(if t.starts_with('-') { -n } else { n }));
            }
            _ => ("exit", t),
        },
    };
    let n = number(val).map_err(|_| bad(&format!("'{val}' is not a number")))?;
    match kind {
        "exit" | "exits" | "e" => Ok(Point::Exit(n)),
        "ckpt" | "checkpoint" | "c" => Ok(Point::Checkpoint(u32::try_from(n).map_err(|_| bad("no such checkpoint"))?)),
        "event" | "ev" => Ok(Point::Event(n as usize)),
        _ => Err(bad(&format!("unknown kind '{kind}'"))),
    }
}

/// Parses a search pattern: a quoted string, hex bytes (`de ad be ef`,
/// `deadbeef`, `0xde 0xad`), or with a size (`/b /h /w /g`) little-endian
/// integers.
pub fn pattern(words: &[Word], size: Option<usize>) -> Result<Vec<u8>, Error> {
    if words.is_empty() {
        return Err(usage("nothing to search for: give a \"string\", hex bytes (de ad be ef) or find/g VALUE"));
    }
    let mut out = Vec::new();
    for w in words {
        match (w, size) {
            (Word::Quoted(b), _) => out.extend_from_slice(b),
            (Word::Plain(s), Some(n)) => {
                let v = number(s)?;
                if n < 8 && v >> (8 * n) != 0 {
                    return Err(usage(format!("{s} does not fit in {n} bytes")));
                }
                out.extend_from_slice(&v.to_le_bytes()[..n]);
            }
            (Word::Plain(s), None) => {
                let h = s.strip_prefix("0x").unwrap_or(s).replace('_', "");
                if h.is_empty() || h.len() % 2 != 0 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(usage(format!(
                        "'{s}' is not hex bytes (an even number of hex digits); quote strings: find \"text\""
                    )));
                }
                out.extend(hex::decode(&h).map_err(|e| usage(e.to_string()))?);
            }
        }
    }
    Ok(out)
}

/// An address expression: terms joined by `+`/`-`; a term is a number, a
/// register (`$rip`, `$rsp`, ...) or a symbol of the guest image.
pub fn address(s: &str, resolve: &mut dyn FnMut(&str) -> Result<u64, Error>) -> Result<u64, Error> {
    let t = s.trim();
    if t.is_empty() {
        return Err(usage("missing address"));
    }
    let mut total: u64 = 0;
    let mut sign = 1i8;
    let mut term = String::new();
    let mut flush = |term: &mut String, sign: i8, total: &mut u64| -> Result<(), Error> {
        let w = term.trim();
        if w.is_empty() {
            return Err(usage(format!("bad address expression '{s}'")));
        }
        let v = if w.starts_with(|c: char| c.is_ascii_digit()) { number(w)? } else { resolve(w)? };
        *total = if sign > 0 { total.wrapping_add(v) } else { total.wrapping_sub(v) };
        term.clear();
        Ok(())
    };
    for (i, c) in t.char_indices() {
        if (c == '+' || c == '-') && i > 0 {
            flush(&mut term, sign, &mut total)?;
            sign = if c == '+' { 1 } else { -1 };
        } else if (c == '+' || c == '-') && i == 0 {
            sign = if c == '+' { 1 } else { -1 };
        } else {
            term.push(c);
        }
    }
    flush(&mut term, sign, &mut total)?;
    Ok(total)
}

/// gdb's `x/FMT`: count, format letter, unit size letter, in any order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fmt {
    pub count: usize,
    /// 'x' hex, 'd' decimal, 'u' unsigned, 's' string, 'i' instruction, 'c' char.
    pub letter: char,
    pub size: usize,
}

pub fn fmt(spec: &str) -> Result<Fmt, Error> {
    let mut f = Fmt { count: 0, letter: 'x', size: 0 };
    let digits: String = spec.chars().take_while(|c| c.is_ascii_digit()).collect();
    if !digits.is_empty() {
        f.count = digits.parse().map_err(|_| usage(format!("bad count in /{spec}")))?;
    }
    for c in spec[digits.len()..].chars() {
        match c {
            'x' | 'd' | 'u' | 's' | 'i' | 'c' => f.letter = c,
            'b' => f.size = 1,
            'h' => f.size = 2,
            'w' => f.size = 4,
            'g' => f.size = 8,
            _ => {
                return Err(usage(format!(
                    "bad format letter '{c}' in /{spec}: use a count, then x (hex), d, u, c, s (string) or i (instructions), then b/h/w/g (1/2/4/8 bytes)"
                )))
            }
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_split_outside_quotes() {
        assert_eq!(split_commands("regs; find \"a;b\" ;  ; where"), vec!["regs", "find \"a;b\"", "where"]);
        assert_eq!(split_commands("find \"\\\";x\"; q"), vec!["find \"\\\";x\"", "q"]);
    }

    #[test]
    fn words_and_escapes() {
        let w = words(r#"find "hi\x00\n" 41 "#).unwrap();
        assert_eq!(w, vec![Word::Plain("find".into()), Word::Quoted(b"hi\0\n".to_vec()), Word::Plain("41".into())]);
        assert!(words("find \"open").is_err());
    }

    #[test]
    fn points() {
        assert_eq!(point("exit:10").unwrap(), Point::Exit(10));
        assert_eq!(point("0x10").unwrap(), Point::Exit(16));
        assert_eq!(point("ckpt:2").unwrap(), Point::Checkpoint(2));
        assert_eq!(point("event:7").unwrap(), Point::Event(7));
        assert_eq!(point("-5").unwrap(), Point::Rel(-5));
        assert_eq!(point("end").unwrap(), Point::End);
        let p = crate::clock::ExecPoint { exits: 5, branches: 3, rip: 0x1000 };
        assert_eq!(point("5:3:0x1000").unwrap(), Point::Exec(p));
        assert_eq!(point("exit:5:3:0x1000").unwrap(), Point::Exec(p));
        assert!(point("5:x:1").is_err());
        assert!(point("bogus:1").is_err());
        assert!(point("exit:x").is_err());
    }

    #[test]
    fn patterns() {
        assert_eq!(pattern(&[Word::Plain("dead".into()), Word::Plain("0xbeef".into())], None).unwrap(), vec![0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(pattern(&[Word::Plain("0x200000".into())], Some(8)).unwrap(), vec![0, 0, 0x20, 0, 0, 0, 0, 0]);
        assert!(pattern(&[Word::Plain("abc".into())], None).is_err());
        assert!(pattern(&[Word::Plain("0x1ff".into())], Some(1)).is_err());
    }

    #[test]
    fn addresses() {
        let mut r = |n: &str| match n {
            "$rsp" => Ok(0x1000),
            "serve" => Ok(0x100500),
            _ => Err(Error::Usage(format!("no symbol {n}"))),
        };
        assert_eq!(address("0x10", &mut r).unwrap(), 0x10);
        assert_eq!(address("$rsp+8", &mut r).unwrap(), 0x1008);
        assert_eq!(address("serve+0x10-1", &mut r).unwrap(), 0x10050f);
        assert!(address("nosuch", &mut r).is_err());
        assert!(address("1+", &mut r).is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(fmt("16xb").unwrap(), Fmt { count: 16, letter: 'x', size: 1 });
        assert_eq!(fmt("4gx").unwrap(), Fmt { count: 4, letter: 'x', size: 8 });
        assert_eq!(fmt("s").unwrap(), Fmt { count: 0, letter: 's', size: 0 });
        assert!(fmt("3q").is_err());
    }
}
