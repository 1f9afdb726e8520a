//! A DMA block device on ports: the guest names a sector range and a buffer,
//! the VMM copies synchronously between the disk file and guest memory.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vmm::layout::ports;

pub const SECTOR: u64 = 512;

pub const STATUS_OK: u32 = 0;
pub const STATUS_NO_DISK: u32 = 1;
pub const STATUS_RANGE: u32 = 2;
pub const STATUS_IO: u32 = 3;
pub const STATUS_BAD_ADDR: u32 = 4;
pub const STATUS_BAD_CMD: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk image {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("disk image {path} is {size} bytes, not a multiple of 512-byte sectors")]
    Size { path: String, size: u64 },
}

/// Guest-visible registers; what a checkpoint must carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRegs {
    pub lba: u32,
    pub addr: u32,
    pub count: u32,
    pub status: u32,
}

pub struct Block {
    pub regs: BlockRegs,
    disk: Option<(File, PathBuf)>,
    sectors: u64,
    /// Sectors written since the last `take_dirty` (for incremental checkpoints).
    pub written_sectors: BTreeSet<u64>,
    /// Guest pages the device wrote by DMA since the last `take_dirty`:
    /// KVM's dirty log only sees writes made by the guest itself.
    pub dma_pages: BTreeSet<u64>,
}

impl Block {
    pub fn new(path: Option<&Path>) -> Result<Block, DiskError> {
        let mut b = Block {
            regs: BlockRegs::default(),
            disk: None,
            sectors: 0,
            written_sectors: BTreeSet::new(),
            dma_pages: BTreeSet::new(),
        };
        if let Some(p) = path {
            let err = |source| DiskError::Open { path: p.display().to_string(), source };
            let f = OpenOptions::new().read(true).write(true).open(p).map_err(err)?;
            let size = f.metadata().map_err(err)?.len();
            if size % SECTOR != 0 {
                return Err(DiskError::Size { path: p.display().to_string(), size });
            }
            b.sectors = size / SECTOR;
            b.disk = Some((f, p.to_path_buf()));
        }
        Ok(b)
    }

    pub fn path(&self) -> Option<&Path> {
        self.disk.as_ref().map(|(_, p)| p.as_path())
    }

    pub fn capacity(&self) -> u64 {
        self.sectors
    }

    /// Reads `count` sectors from the disk file (for checkpoints and hashes).
    pub fn read_sectors(&self, first: u64, count: u64) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; (count * SECTOR) as usize];
        if let Some((f, _)) = &self.disk {
            f.read_exact_at(&mut buf, first * SECTOR)?;
        }
        Ok(buf)
    }

    /// Overwrites sectors (restoring a checkpoint's disk delta).
    pub fn write_sectors(&self, first: u64, data: &[u8]) -> std::io::Result<()> {
        match &self.disk {
            Some((f, _)) => f.write_all_at(data, first * SECTOR),
            None => Ok(()),
        }
    }

    pub fn read_port(&self, port: u16) -> u32 {
        match port {
            ports::BLK_LBA => self.regs.lba,
            ports::BLK_ADDR => self.regs.addr,
            ports::BLK_COUNT => self.regs.count,
            ports::BLK_CMD => self.regs.status,
            ports::BLK_CAPACITY => self.sectors.min(u32::MAX as u64) as u32,
            _ => 0xFFFF_FFFF,
        }
    }

    pub fn write_port(&mut self, port: u16, value: u32, mem: &GuestMemoryMmap) {
        match port {
            ports::BLK_LBA => self.regs.lba = value,
            ports::BLK_ADDR => self.regs.addr = value,
            ports::BLK_COUNT => self.regs.count = value,
            ports::BLK_CMD => self.regs.status = self.command(value, mem),
            _ => {}
        }
    }

    fn command(&mut self, cmd: u32, mem: &GuestMemoryMmap) -> u32 {
        let Some((file, _)) = &self.disk else { return STATUS_NO_DISK };
        let (lba, count) = (self.regs.lba as u64, self.regs.count as u64);
        if lba + count > self.sectors {
            return STATUS_RANGE;
        }
        let len = (count * SECTOR) as usize;
        let addr = GuestAddress(self.regs.addr as u64);
        let mut buf = vec![0u8; len];
        match cmd {
            1 => {
                if file.read_exact_at(&mut buf, lba * SECTOR).is_err() {
                    return STATUS_IO;
                }
                if mem.write_slice(&buf, addr).is_err() {
                    return STATUS_BAD_ADDR;
                }
                let (first, last) = (addr.0 / 4096, (addr.0 + len as u64 - 1) / 4096);
                self.dma_pages.extend(first..=last);
                STATUS_OK
            }
            2 => {
                if mem.read_slice(&mut buf, addr).is_err() {
                    return STATUS_BAD_ADDR;
                }
                if file.write_all_at(&buf, lba * SECTOR).is_err() {
                    return STATUS_IO;
                }
                self.written_sectors.extend(lba..lba + count);
                STATUS_OK
            }
            _ => STATUS_BAD_CMD,
        }
    }
}
