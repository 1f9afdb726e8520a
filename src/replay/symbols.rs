//! Symbols of the recorded guest image (`image.elf` in the recording): the
//! ELF64 `.symtab`, read with every offset bound-checked. A stripped or odd
//! image simply has no symbols.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub name: String,
    pub addr: u64,
    pub size: u64,
    /// ELF symbol type: 0 none, 1 object, 2 function.
    pub kind: u8,
}

#[derive(Debug, Default, Clone)]
pub struct Symbols {
    /// Sorted by address, then name.
    syms: Vec<Symbol>,
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o.checked_add(2)?)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o.checked_add(4)?)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o.checked_add(8)?)?.try_into().ok()?))
}

const SHT_SYMTAB: u32 = 2;
const STT_SECTION: u8 = 3;
const STT_FILE: u8 = 4;

impl Symbols {
    /// Reads the symbol table of an ELF64 little-endian file; empty on anything unexpected.
    pub fn from_elf(b: &[u8]) -> Symbols {
        Symbols::parse(b).unwrap_or_default()
    }

    fn parse(b: &[u8]) -> Option<Symbols> {
        if b.get(..4)? != b"\x7fELF" || *b.get(4)? != 2 || *b.get(5)? != 1 {
            return None;
        }
        let shoff = u64_at(b, 0x28)? as usize;
        let shentsize = u16_at(b, 0x3A)? as usize;
        let shnum = u16_at(b, 0x3C)? as usize;
        if shentsize < 64 {
            return None;
        }
        let sh = |i: usize| -> Option<(u32, usize, usize, u32, usize)> {
            let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
            Some((
                u32_at(b, h + 4)?,            // sh_type
                u64_at(b, h + 0x18)? as usize, // sh_offset
                u64_at(b, h + 0x20)? as usize, // sh_size
                u32_at(b, h + 0x28)?,          // sh_link
                u64_at(b, h + 0x38)? as usize, // sh_entsize
            ))
        };
        let mut syms = Vec::new();
        for i in 0..shnum {
            let (ty, off, size, link, entsize) = sh(i)?;
            if ty != SHT_SYMTAB || entsize < 24 {
                continue;
            }
            let (_, stroff, strsize, _, _) = sh(link as usize)?;
            let strtab = b.get(stroff..stroff.checked_add(strsize)?)?;
            let table = b.get(off..off.checked_add(size)?)?;
            for e in table.chunks_exact(entsize) {
                let name_off = u32_at(e, 0)? as usize;
                let info = e[4];
                let shndx = u16_at(e, 6)?;
                let value = u64_at(e, 8)?;
                let sz = u64_at(e, 16)?;
                let kind = info & 0xF;
                if shndx == 0 || kind == STT_SECTION || kind == STT_FILE {
                    continue;
                }
                let name = match strtab.get(name_off..) {
                    Some(s) => s.split(|&c| c == 0).next().unwrap_or_default(),
                    None => continue,
                };
                if name.is_empty() {
                    continue;
                }
                syms.push(Symbol { name: String::from_utf8_lossy(name).into_owned(), addr: value, size: sz, kind });
            }
        }
        syms.sort_by(|a, b| a.addr.cmp(&b.addr).then_with(|| a.name.cmp(&b.name)));
        syms.dedup();
        Some(Symbols { syms })
    }

    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    pub fn all(&self) -> &[Symbol] {
        &self.syms
    }

    pub fn lookup(&self, name: &str) -> Option<&Symbol> {
        self.syms.iter().find(|s| s.name == name)
    }

    /// The symbol `addr` lies in: the closest one at or below it, if `addr`
    /// is inside its size (or, for sizeless symbols, within 4 KiB of it and
    /// before the next symbol).
    pub fn containing(&self, addr: u64) -> Option<(&Symbol, u64)> {
        let i = self.syms.partition_point(|s| s.addr <= addr);
        if i == 0 {
            return None;
        }
        // Prefer a sized symbol that covers addr among those at the same address.
        let at = self.syms[i - 1].addr;
        let same: Vec<&Symbol> = self.syms[..i].iter().rev().take_while(|s| s.addr == at).collect();
        let off = addr - at;
        if let Some(s) = same.iter().find(|s| s.size > 0 && off < s.size) {
            return Some((s, off));
        }
        let s = same.iter().find(|s| s.kind == 2).or(same.first())?;
        if s.size == 0 && off < 0x1000 {
            return Some((s, off));
        }
        None
    }

    /// `<name+0xoff>` for an address inside a symbol, or "".
    pub fn describe(&self, addr: u64) -> String {
        match self.containing(addr) {
            Some((s, 0)) => format!("<{}>", s.name),
            Some((s, off)) => format!("<{}+{off:#x}>", s.name),
            None => String::new(),
        }
    }
}
