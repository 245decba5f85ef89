//! Registration of device buffers with cuFile (`cuFileBufRegister`), done once per
//! allocation and undone when the backend goes away.
//!
//! A request's memory may be anywhere inside an allocation (a tensor inside a caching
//! allocator's block). The containing allocation is found with `cuPointerGetAttributes`
//! (range start, range size, buffer id); the whole allocation is registered with its byte
//! length, and I/O passes the allocation's base plus the byte offset, as cuFile requires for
//! registered buffers. Unaligned offsets are fine: cuFile stages unaligned pieces through its
//! own bounce buffers.
//!
//! The buffer id is unique for the life of the process, so an allocation freed and another
//! one made at the same address is noticed: the stale registration is dropped and the new
//! allocation registered. When registration fails (compat mode, BAR1 too small, memory types
//! cuFile does not register) the allocation is remembered as unregistered and I/O passes the
//! plain pointer, which cuFile accepts for unregistered memory.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cufile::result;
use cudarc::driver::sys as cu;

use crate::driver::guarded;
use crate::status::cufile_error_text;

/// Where to point cuFile for one I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// The base to pass (`bufPtr_base`).
    pub base: u64,
    /// The byte offset from `base` of the request's memory (`bufPtr_offset`).
    pub offset: usize,
    /// Whether `base` is a registered buffer.
    pub registered: bool,
}

impl Resolved {
    /// The pointer itself, unregistered.
    pub fn plain(ptr: u64) -> Self {
        Resolved {
            base: ptr,
            offset: 0,
            registered: false,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    id: u64,
    size: usize,
    registered: bool,
}

#[derive(Default)]
struct State {
    entries: HashMap<u64, Entry>,
    noted: bool,
}

/// The allocations seen so far and whether each is registered.
pub(crate) struct BufferCache {
    enabled: bool,
    max_register_bytes: u64,
    state: Mutex<State>,
}

/// (start, size, buffer id) of the allocation containing `ptr`.
fn allocation_of(ptr: u64) -> Option<(u64, usize, u64)> {
    let mut start: cu::CUdeviceptr = 0;
    let mut size: usize = 0;
    let mut id: u64 = 0;
    let mut attrs = [
        cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
        cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
        cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_BUFFER_ID,
    ];
    let mut data: [*mut c_void; 3] = [
        (&mut start as *mut cu::CUdeviceptr).cast(),
        (&mut size as *mut usize).cast(),
        (&mut id as *mut u64).cast(),
    ];
    // SAFETY: three attributes, each with a writable destination of the type the driver
    // documents (CUdeviceptr, size_t, unsigned long long); ptr is only inspected.
    let rc = guarded("cuPointerGetAttributes", || unsafe {
        cu::cuPointerGetAttributes(3, attrs.as_mut_ptr(), data.as_mut_ptr(), ptr)
    })
    .ok()?;
    (rc == cu::CUresult::CUDA_SUCCESS && start != 0 && size != 0).then_some((start, size, id))
}

impl BufferCache {
    /// A cache that registers when `enabled`, allocations of at most `max_register_bytes`.
    pub fn new(enabled: bool, max_register_bytes: u64) -> Self {
        BufferCache {
            enabled,
            max_register_bytes,
            state: Mutex::new(State::default()),
        }
    }

    /// Where to point cuFile for `len` bytes of device memory at `ptr`, registering the
    /// containing allocation the first time it is seen. Never fails: anything unexpected
    /// gives the plain pointer. Call with the backend's context current.
    pub fn resolve(&self, ptr: u64, len: usize) -> Resolved {
        if !self.enabled {
            return Resolved::plain(ptr);
        }
        let Some((start, size, id)) = allocation_of(ptr) else {
            return Resolved::plain(ptr);
        };
        let inside = ptr >= start && (ptr - start).saturating_add(len as u64) <= size as u64;
        if !inside {
            return Resolved::plain(ptr);
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let entry = match st.entries.get(&start).copied() {
            Some(e) if e.id == id && e.size == size => e,
            stale => {
                if let Some(old) = stale.filter(|e| e.registered) {
                    tracing::debug!(
                        base = start,
                        size = old.size,
                        "allocation replaced; dropping its registration"
                    );
                    deregister(start);
                }
                let e = Entry {
                    id,
                    size,
                    registered: self.register(&mut st, start, size),
                };
                st.entries.insert(start, e);
                e
            }
        };
        if entry.registered {
            Resolved {
                base: start,
                offset: (ptr - start) as usize,
                registered: true,
            }
        } else {
            Resolved::plain(ptr)
        }
    }

    fn register(&self, st: &mut State, start: u64, size: usize) -> bool {
        if size as u64 > self.max_register_bytes {
            self.note(
                st,
                &format!(
                    "the allocation of {size} bytes is larger than cuFile's pinned-memory limit ({} bytes)",
                    self.max_register_bytes
                ),
            );
            return false;
        }
        // SAFETY: [start, start + size) is a live device allocation (the driver just reported
        // it) and `size` is its length in bytes; it is deregistered in `deregister_all` or
        // when the address is found reused.
        let r = guarded("cuFileBufRegister", || unsafe {
            result::buf_register(start as *const c_void, size, 0)
        });
        match r {
            Ok(Ok(())) => {
                tracing::debug!(base = start, size, "registered device buffer with cuFile");
                true
            }
            Ok(Err(e)) => {
                self.note(
                    st,
                    &format!("cuFileBufRegister failed: {}", cufile_error_text(&e)),
                );
                false
            }
            Err(e) => {
                self.note(st, &e.to_string());
                false
            }
        }
    }

    fn note(&self, st: &mut State, why: &str) {
        if st.noted {
            tracing::debug!("device buffer left unregistered: {why}");
        } else {
            st.noted = true;
            tracing::info!(
                "cuFile buffer registration unavailable ({why}); continuing with unregistered buffers, which cuFile stages through its own bounce buffers"
            );
        }
    }

    /// (registered allocations, their bytes, allocations left unregistered).
    pub fn stats(&self) -> (usize, u64, usize) {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let reg = st.entries.values().filter(|e| e.registered);
        let (n, bytes) = reg.fold((0, 0u64), |(n, b), e| (n + 1, b + e.size as u64));
        (n, bytes, st.entries.len() - n)
    }

    /// Deregisters everything. Call with the backend's context current and no I/O running.
    pub fn deregister_all(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for (start, e) in st.entries.drain() {
            if e.registered {
                deregister(start);
            }
        }
    }
}

fn deregister(start: u64) {
    // SAFETY: `start` was registered by `register`; a freed allocation only makes cuFile
    // return an error, which is ignored.
    let r = guarded("cuFileBufDeregister", || unsafe {
        result::buf_deregister(start as *const c_void)
    });
    if let Ok(Err(e)) = r {
        tracing::debug!(base = start, "cuFileBufDeregister: {}", cufile_error_text(&e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disabled_cache_passes_pointers_through() {
        let c = BufferCache::new(false, u64::MAX);
        assert_eq!(c.resolve(0x7000_1234, 10), Resolved::plain(0x7000_1234));
        assert_eq!(c.stats(), (0, 0, 0));
        c.deregister_all();
    }
}
