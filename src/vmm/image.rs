//! ELF64 guest images: parsing with every bound checked, so a truncated or
//! hostile file yields an error that names the problem instead of a panic.

use std::path::Path;

use super::layout::IMAGE_MIN_ADDR;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("not an ELF file (bad magic): {0}")]
    NotElf(String),
    #[error("unsupported ELF image: {0}")]
    Unsupported(String),
    #[error("corrupt ELF image: {0}")]
    Corrupt(String),
    #[error("image does not fit the VM: {0}")]
    DoesNotFit(String),
}

/// One loadable segment: `data` goes at `paddr`, followed by `memsz - data.len()` zero bytes.
#[derive(Debug, Clone)]
pub struct Segment {
    pub paddr: u64,
    pub memsz: u64,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Image {
    pub entry: u64,
    pub segments: Vec<Segment>,
}

const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// What the ELF header says: the entry point and where the program header
/// table is, the table checked to lie inside the file.
struct Header {
    entry: u64,
    phoff: u64,
    phentsize: u64,
    phnum: u64,
}

impl Header {
    fn parse(b: &[u8]) -> Result<Header, ImageError> {
        if b.len() < 4 || &b[..4] != b"\x7fELF" {
            return Err(ImageError::NotElf(format!(
                "{} bytes, expected it to start with 0x7f 'E' 'L' 'F'",
                b.len()
            )));
        }
        if b.len() < 64 {
            return Err(ImageError::Corrupt(format!(
                "truncated ELF header ({} of 64 bytes)",
                b.len()
            )));
        }
        if b[4] != 2 {
            return Err(ImageError::Unsupported(
                "ELF class is not ELF64 (a 32-bit image?)".into(),
            ));
        }
        if b[5] != 1 {
            return Err(ImageError::Unsupported("ELF data is not little-endian".into()));
        }
        let e_type = u16_at(b, 16).unwrap_or(0);
        let e_machine = u16_at(b, 18).unwrap_or(0);
        if e_machine != EM_X86_64 {
            return Err(ImageError::Unsupported(format!(
                "ELF machine is {e_machine}, expected x86-64 (62)"
            )));
        }
        if e_type != ET_EXEC {
            return Err(ImageError::Unsupported(format!(
                "ELF type is {e_type}, expected a static executable (ET_EXEC = 2)"
            )));
        }
        let h = Header {
            entry: u64_at(b, 24).unwrap_or(0),
            phoff: u64_at(b, 32).unwrap_or(0),
            phentsize: u16_at(b, 54).unwrap_or(0) as u64,
            phnum: u16_at(b, 56).unwrap_or(0) as u64,
        };
        if h.phnum == 0 {
            return Err(ImageError::Corrupt("no program headers".into()));
        }
        if h.phentsize < 56 {
            return Err(ImageError::Corrupt(format!(
                "program header entry size {} < 56",
                h.phentsize
            )));
        }
        let table_end = h
            .phentsize
            .checked_mul(h.phnum)
            .and_then(|n| n.checked_add(h.phoff))
            .ok_or_else(|| ImageError::Corrupt("program header table offset overflows".into()))?;
        if table_end > b.len() as u64 {
            return Err(ImageError::Corrupt(format!(
                "program header table ends at byte {table_end} but the file has {} bytes (truncated?)",
                b.len()
            )));
        }
        Ok(h)
    }
}

/// Program header `i` (at byte `h`) as a segment to load, when it is a
/// non-empty PT_LOAD whose bytes lie inside the file.
fn load_segment(b: &[u8], i: u64, h: usize) -> Result<Option<Segment>, ImageError> {
    let p_type = u32_at(b, h).unwrap_or(0);
    if p_type != PT_LOAD {
        return Ok(None);
    }
    let offset = u64_at(b, h + 8).unwrap_or(0);
    let paddr = u64_at(b, h + 24).unwrap_or(0);
    let filesz = u64_at(b, h + 32).unwrap_or(0);
    let memsz = u64_at(b, h + 40).unwrap_or(0);
    if memsz == 0 {
        return Ok(None);
    }
    if filesz > memsz {
        return Err(ImageError::Corrupt(format!(
            "segment {i}: file size {filesz:#x} exceeds memory size {memsz:#x}"
        )));
    }
    let end = offset.checked_add(filesz).filter(|&e| e <= b.len() as u64).ok_or_else(|| {
        ImageError::Corrupt(format!(
            "segment {i}: bytes {offset:#x}..+{filesz:#x} lie beyond the end of the file ({} bytes; truncated?)",
            b.len()
        ))
    })?;
    paddr.checked_add(memsz).ok_or_else(|| {
        ImageError::Corrupt(format!("segment {i}: address range overflows"))
    })?;
    Ok(Some(Segment {
        paddr,
        memsz,
        data: b[offset as usize..end as usize].to_vec(),
    }))
}

impl Image {
    pub fn load_file(path: &Path) -> Result<Image, ImageError> {
        let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Image::parse(&bytes)
    }

    /// Parses an ELF64 x86-64 executable. Only PT_LOAD segments matter.
    pub fn parse(b: &[u8]) -> Result<Image, ImageError> {
        let h = Header::parse(b)?;
        let mut segments = Vec::new();
        for i in 0..h.phnum {
            if let Some(s) = load_segment(b, i, (h.phoff + i * h.phentsize) as usize)? {
                segments.push(s);
            }
        }
        if segments.is_empty() {
            return Err(ImageError::Corrupt("no loadable (PT_LOAD) segments".into()));
        }
        segments.sort_by_key(|s| s.paddr);
        for w in segments.windows(2) {
            if w[0].paddr + w[0].memsz > w[1].paddr {
                return Err(ImageError::Corrupt(format!(
                    "segments overlap: {:#x}..{:#x} and {:#x}..{:#x}",
                    w[0].paddr,
                    w[0].paddr + w[0].memsz,
                    w[1].paddr,
                    w[1].paddr + w[1].memsz
                )));
            }
        }
        let entry = h.entry;
        if !segments.iter().any(|s| entry >= s.paddr && entry < s.paddr + s.memsz) {
            return Err(ImageError::Corrupt(format!(
                "entry point {entry:#x} is not inside any loaded segment"
            )));
        }
        Ok(Image { entry, segments })
    }

    /// Checks that the image fits a VM with `mem_size` bytes of RAM.
    pub fn check_fits(&self, mem_size: u64) -> Result<(), ImageError> {
        for s in &self.segments {
            if s.paddr < IMAGE_MIN_ADDR {
                return Err(ImageError::DoesNotFit(format!(
                    "segment at {:#x} lies below {IMAGE_MIN_ADDR:#x}, which is reserved for the VMM's boot structures",
                    s.paddr
                )));
            }
            if s.paddr + s.memsz > mem_size {
                return Err(ImageError::DoesNotFit(format!(
                    "segment {:#x}..{:#x} lies beyond the end of guest RAM ({} MiB); try a larger --mem",
                    s.paddr,
                    s.paddr + s.memsz,
                    mem_size >> 20
                )));
            }
        }
        Ok(())
    }

    /// First page-aligned address after the highest segment.
    pub fn end(&self) -> u64 {
        let end = self.segments.iter().map(|s| s.paddr + s.memsz).max().unwrap_or(0);
        (end + 0xFFF) & !0xFFF
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(entry: u64, segs: &[(u64, u64, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        let data_start = 64 + 56 * segs.len();
        let mut off = data_start as u64;
        let mut data = Vec::new();
        for (paddr, memsz, bytes) in segs {
            let mut h = vec![0u8; 56];
            h[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
            h[8..16].copy_from_slice(&off.to_le_bytes());
            h[16..24].copy_from_slice(&paddr.to_le_bytes());
            h[24..32].copy_from_slice(&paddr.to_le_bytes());
            h[32..40].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            h[40..48].copy_from_slice(&memsz.to_le_bytes());
            b.extend_from_slice(&h);
            data.extend_from_slice(bytes);
            off += bytes.len() as u64;
        }
        b.extend_from_slice(&data);
        b
    }

    #[test]
    fn parses_a_minimal_image() {
        let img = Image::parse(&elf(0x100000, &[(0x100000, 0x2000, &[0xf4; 16])])).unwrap();
        assert_eq!(img.entry, 0x100000);
        assert_eq!(img.segments[0].data.len(), 16);
        assert_eq!(img.end(), 0x102000);
        img.check_fits(64 << 20).unwrap();
    }

    #[test]
    fn rejects_bad_images_with_clear_errors() {
        let err = |b: &[u8]| Image::parse(b).unwrap_err().to_string();
        assert!(err(b"hello world").contains("not an ELF"));
        let good = elf(0x100000, &[(0x100000, 0x1000, &[1; 100])]);
        assert!(err(&good[..40]).contains("truncated ELF header"));
        assert!(err(&good[..good.len() - 10]).contains("beyond the end of the file"));
        let mut wrong_machine = good.clone();
        wrong_machine[18] = 40; // ARM
        assert!(err(&wrong_machine).contains("x86-64"));
        let mut elf32 = good.clone();
        elf32[4] = 1;
        assert!(err(&elf32).contains("ELF64"));
        let overlap = elf(0x100000, &[(0x100000, 0x2000, &[0]), (0x101000, 0x1000, &[0])]);
        assert!(err(&overlap).contains("overlap"));
        let bad_entry = elf(0x500000, &[(0x100000, 0x1000, &[0])]);
        assert!(err(&bad_entry).contains("entry point"));
    }

    #[test]
    fn rejects_images_that_do_not_fit() {
        let low = Image::parse(&elf(0x1000, &[(0x1000, 0x1000, &[0])])).unwrap();
        assert!(low.check_fits(64 << 20).unwrap_err().to_string().contains("reserved"));
        let big = Image::parse(&elf(0x100000, &[(0x100000, 128 << 20, &[0])])).unwrap();
        assert!(big.check_fits(64 << 20).unwrap_err().to_string().contains("--mem"));
    }
}
