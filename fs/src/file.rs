//! What a file's open handles have written and not yet committed.
//!
//! Writes land here, per inode (shared by all handles on this node, so a
//! second reader on the node sees them), as whole chunk buffers. `close`
//! and `fsync` turn the changed slots into chunks and one `SetContent`
//! command: the file changes cluster-wide at once, whole (close-to-open).
//! Large sequential writes do not pile up in memory: past a bound the
//! buffers are stored as chunks early and only their hashes kept.
//!
//! Invariant kept by `truncate`: no committed chunk holds bytes past the
//! file's size, so growing a file later reads zeros there.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use wpfs_consensus::namespace::{Hash, Namespace};
use wpfs_consensus::CHUNK_SIZE;
use wpfs_proto::{ChunkRef, Create, Inode, SetContent};

use crate::chunks::{ChunkStore, Pinned};
use crate::error::{Errno, Result};

const CHUNK: usize = CHUNK_SIZE as usize;
/// Unsealed buffers kept per file before they are stored early.
const MAX_BUFFERED_CHUNKS: usize = 256;

enum Slot {
    /// Bytes of the slot from its start (shorter than a chunk: zeros follow).
    Buffered(Vec<u8>),
    /// Already stored as a chunk.
    Sealed { hash: Hash, len: u32 },
}

/// Where contents are read from: the namespace's slots and the chunks.
#[derive(Clone)]
pub struct Contents {
    pub namespace: Namespace,
    pub chunks: Arc<ChunkStore>,
}

/// A file deleted on another node while it is open here: its inode and
/// committed slots as they were just before, their chunks pinned against
/// collection until the last handle here closes. POSIX keeps an unlinked
/// file readable for whoever has it open; so does every node.
pub struct Kept {
    pub inode: Inode,
    slots: Vec<ChunkRef>,
    _pins: Pinned,
}

impl Kept {
    /// Keeps file `ino` as the store holds it now; `None` if it does not.
    pub fn take(contents: &Contents, ino: u64) -> Result<Option<Kept>> {
        let Some(inode) = contents.namespace.inode(ino)? else {
            return Ok(None);
        };
        let slots = contents.namespace.chunk_slots(ino, 0, u64::MAX, None)?;
        let mut pins = Pinned::new(contents.chunks.clone());
        for slot in &slots {
            if let Ok(hash) = Hash::try_from(&slot.hash[..]) {
                pins.hold(hash);
            }
        }
        Ok(Some(Kept {
            inode: Inode { nlink: 0, ..inode },
            slots,
            _pins: pins,
        }))
    }
}

pub struct FileState {
    ino: u64,
    /// The size including uncommitted writes.
    pub size: u64,
    pub mtime_ns: i64,
    dirty: BTreeMap<u64, Slot>,
    /// How many of `dirty` are `Buffered` (kept, not counted per write).
    buffered: usize,
    /// Lowest size the file was truncated to since the last commit: slots
    /// from there on are holes unless written again.
    truncated_at: Option<u64>,
    changed: bool,
    pins: Option<Pinned>,
    /// A file created here and not proposed yet: its first commit creates
    /// it (`SetContent.create`).
    birth: Option<Create>,
}

impl FileState {
    pub fn new(inode: &Inode) -> Self {
        FileState {
            ino: inode.ino,
            size: inode.size,
            mtime_ns: inode.mtime_ns,
            dirty: BTreeMap::new(),
            buffered: 0,
            truncated_at: None,
            changed: false,
            pins: None,
            birth: None,
        }
    }

    /// The state of a file `create` makes, with no contents yet: its first
    /// commit (even with nothing written) makes it in the namespace.
    pub fn unborn(inode: &Inode, create: Create) -> Self {
        FileState {
            truncated_at: Some(0),
            changed: true,
            birth: Some(create),
            ..FileState::new(inode)
        }
    }

    pub fn ino(&self) -> u64 {
        self.ino
    }

    pub fn is_dirty(&self) -> bool {
        self.changed
    }

    /// How the file is created, if it is not yet.
    pub fn birth(&self) -> Option<&Create> {
        self.birth.as_ref()
    }

    /// How the file is created, if it is not yet and nothing has been
    /// written to it (nor its size set): an `O_CREAT|O_TRUNC` open that
    /// has written nothing yet.
    pub fn empty_birth(&self) -> Option<&Create> {
        (self.birth.as_ref()).filter(|_| self.dirty.is_empty() && self.size == 0)
    }

    /// Re-reads size and mtime from the committed inode, when clean.
    pub fn refresh(&mut self, inode: &Inode) {
        if !self.changed {
            self.size = inode.size;
            self.mtime_ns = inode.mtime_ns;
        }
    }

    fn truncated_away(&self, index: u64) -> bool {
        self.truncated_at
            .is_some_and(|t| index >= t.div_ceil(CHUNK_SIZE))
    }

    /// The current bytes of slot `index`, as a buffer to change.
    fn take_buffer(&mut self, contents: &Contents, index: u64) -> Result<Vec<u8>> {
        let mut buf = match self.dirty.remove(&index) {
            Some(Slot::Buffered(v)) => {
                self.buffered -= 1;
                v
            }
            Some(Slot::Sealed { hash, .. }) => contents.chunks.get(&hash, None)?,
            None if self.truncated_away(index) => Vec::new(),
            None => match contents
                .namespace
                .chunk_slots(self.ino, index, index, None)?
                .pop()
            {
                Some(slot) => contents.chunks.get(&slot.hash, None)?,
                None => Vec::new(),
            },
        };
        buf.reserve_exact(CHUNK.saturating_sub(buf.len()));
        Ok(buf)
    }

    pub fn write(
        &mut self,
        contents: &Contents,
        offset: u64,
        data: &[u8],
        now_ns: i64,
    ) -> Result<()> {
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let index = pos / CHUNK_SIZE;
            let within = (pos % CHUNK_SIZE) as usize;
            let n = rest.len().min(CHUNK - within);
            let mut buf = if within == 0 && n == CHUNK {
                Vec::with_capacity(CHUNK) // overwritten whole: no need to read it
            } else {
                self.take_buffer(contents, index)?
            };
            if buf.len() < within + n {
                buf.resize(within + n, 0);
            }
            buf[within..within + n].copy_from_slice(&rest[..n]);
            self.put_buffer(index, buf);
            pos += n as u64;
            rest = &rest[n..];
        }
        self.size = self.size.max(offset + data.len() as u64);
        self.mtime_ns = now_ns;
        self.changed = true;
        if self.buffered > MAX_BUFFERED_CHUNKS {
            self.seal_all(contents, false)?;
        }
        Ok(())
    }

    fn put_buffer(&mut self, index: u64, buf: Vec<u8>) {
        if !matches!(
            self.dirty.insert(index, Slot::Buffered(buf)),
            Some(Slot::Buffered(_))
        ) {
            self.buffered += 1;
        }
    }

    pub fn truncate(&mut self, contents: &Contents, size: u64, now_ns: i64) -> Result<()> {
        if size < self.size {
            let kept_slots = size.div_ceil(CHUNK_SIZE);
            self.dirty.retain(|&i, _| i < kept_slots);
            self.buffered = self
                .dirty
                .values()
                .filter(|s| matches!(s, Slot::Buffered(_)))
                .count();
            let within = (size % CHUNK_SIZE) as usize;
            if within != 0 {
                let index = size / CHUNK_SIZE;
                let mut buf = self.take_buffer(contents, index)?;
                buf.truncate(within);
                self.put_buffer(index, buf);
            }
            self.truncated_at = Some(self.truncated_at.map_or(size, |t| t.min(size)));
        }
        self.size = size;
        self.mtime_ns = now_ns;
        self.changed = true;
        Ok(())
    }

    /// Stores every buffered slot as a chunk, keeping it pinned. With
    /// `carry`, the sealed bytes are handed back rather than dropped.
    fn seal_all(&mut self, contents: &Contents, carry: bool) -> Result<Vec<Vec<u8>>> {
        let pins = self
            .pins
            .get_or_insert_with(|| Pinned::new(contents.chunks.clone()));
        let mut carried = Vec::new();
        for slot in self.dirty.values_mut() {
            if let Slot::Buffered(buf) = slot {
                let hash = pins.put(buf)?;
                let buf = std::mem::take(buf);
                *slot = Slot::Sealed {
                    hash,
                    len: buf.len() as u32,
                };
                if carry && !buf.is_empty() {
                    carried.push(buf);
                }
            }
        }
        self.buffered = 0;
        Ok(carried)
    }

    /// The command that commits what changed, carrying the new chunks'
    /// bytes when they are all still buffered and at most `carry_max` in
    /// all (see `replication`). The state stays dirty until `committed` is
    /// called, so a failed commit can be retried.
    pub fn update(&mut self, contents: &Contents, carry_max: usize) -> Result<SetContent> {
        let mut bytes = 0;
        let all_buffered = self.dirty.values().all(|slot| match slot {
            Slot::Buffered(buf) => {
                bytes += buf.len();
                true
            }
            Slot::Sealed { len, .. } => *len == 0,
        });
        let carried = self.seal_all(contents, all_buffered && bytes <= carry_max)?;
        let chunks = self
            .dirty
            .iter()
            .map(|(&index, slot)| match slot {
                Slot::Sealed { hash, len } if *len > 0 => ChunkRef {
                    index,
                    hash: hash.to_vec(),
                    len: *len,
                },
                _ => ChunkRef {
                    index,
                    hash: vec![],
                    len: 0,
                },
            })
            .collect();
        Ok(SetContent {
            ino: self.ino,
            size: self.size,
            truncated_at: self.truncated_at,
            chunks,
            mtime_ns: self.mtime_ns,
            carried,
            create: self.birth.clone(),
        })
    }

    /// The update was applied: nothing is dirty any more. A file born in
    /// it may have got another node's number (that node made the name
    /// first): later commits go there.
    pub fn committed(&mut self, inode: &Inode) {
        self.ino = inode.ino;
        self.birth = None;
        self.dirty.clear();
        self.buffered = 0;
        self.truncated_at = None;
        self.changed = false;
        self.pins = None;
        self.refresh(inode);
    }

    /// Reads `[offset, offset+len)` of the file as this node sees it: the
    /// uncommitted writes over the committed contents (or over what was
    /// `kept` of it, if it was deleted elsewhere).
    pub fn read(
        &self,
        contents: &Contents,
        offset: u64,
        len: u64,
        kept: Option<&Kept>,
    ) -> Result<Vec<u8>> {
        read_range(contents, self.ino, self.size, offset, len, Some(self), kept)
    }
}

/// Reads a byte range of file `ino` of `size` bytes, with the uncommitted
/// writes of `state` (if any) over the committed slots: the namespace's,
/// or those `kept` of a file deleted elsewhere. Holes and bytes past a
/// chunk's end read as zeros.
///
/// A committed file deleted by another node has no slots any more: every
/// chunk of it reads as a hole. Zeros would be wrong bytes, so a read that
/// found a hole checks that the file still exists, and fails with ESTALE
/// (as NFS does for a file removed under an open handle) if it does not.
/// A file open here when it was deleted is `kept` instead; a handle opened
/// by a racing lookup, or a snapshot that replaced everything, is not.
pub fn read_range(
    contents: &Contents,
    ino: u64,
    size: u64,
    offset: u64,
    len: u64,
    state: Option<&FileState>,
    kept: Option<&Kept>,
) -> Result<Vec<u8>> {
    if offset >= size || len == 0 {
        return Ok(Vec::new());
    }
    let end = size.min(offset.saturating_add(len));
    let (first, last) = (offset / CHUNK_SIZE, (end - 1) / CHUNK_SIZE);
    // One snapshot for slots and chunks: a concurrent commit cannot pull a
    // chunk away between the two reads. Kept chunks are pinned instead.
    let snapshot = contents.namespace.store().db().snapshot();
    let committed = match kept {
        Some(k) => (k.slots.iter())
            .filter(|s| (first..=last).contains(&s.index))
            .cloned()
            .collect(),
        None => contents
            .namespace
            .chunk_slots(ino, first, last, Some(&snapshot))?,
    };
    let mut committed = committed.into_iter().peekable();
    let mut out = vec![0u8; (end - offset) as usize];
    let mut hole = false;
    // Chunks brought for this read: the first one not here brings the
    // others of the range that are not here either, fetched together.
    let mut brought: HashMap<Hash, Vec<u8>> = HashMap::new();
    for index in first..=last {
        let slot = loop {
            match committed.peek() {
                Some(s) if s.index < index => {
                    committed.next();
                }
                Some(s) if s.index == index => break committed.next(),
                _ => break None,
            }
        };
        let data: Cow<'_, [u8]> = match state.and_then(|s| s.dirty.get(&index)) {
            Some(Slot::Buffered(v)) => Cow::Borrowed(v),
            Some(Slot::Sealed { hash, .. }) => Cow::Owned(contents.chunks.get(hash, None)?),
            None if state.is_some_and(|s| s.truncated_away(index)) => continue,
            None => match slot {
                Some(s) => {
                    let hash = Hash::try_from(&s.hash[..]).map_err(|_| Errno(libc::EIO))?;
                    let others = || {
                        (committed.clone())
                            .filter(|c| state.is_none_or(|st| !st.dirty.contains_key(&c.index)))
                            .filter_map(|c| Hash::try_from(&c.hash[..]).ok())
                            .collect()
                    };
                    let chunks = &contents.chunks;
                    Cow::Owned(chunks.get_or_bring(&hash, Some(&snapshot), &mut brought, others)?)
                }
                None => {
                    hole = true;
                    continue;
                }
            },
        };
        let chunk_start = index * CHUNK_SIZE;
        let from = offset.max(chunk_start);
        let to = end.min(chunk_start + data.len() as u64);
        if to > from {
            let src = &data[(from - chunk_start) as usize..(to - chunk_start) as usize];
            let dst = (from - offset) as usize;
            out[dst..dst + src.len()].copy_from_slice(src);
        }
    }
    let unborn = state.is_some_and(|s| s.birth().is_some());
    if hole && !unborn && kept.is_none() && contents.namespace.inode(ino)?.is_none() {
        return Err(Errno(libc::ESTALE));
    }
    Ok(out)
}
