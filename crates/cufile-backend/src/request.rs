//! One request's life: split into pieces, each piece moved by one `cuFileRead`/`cuFileWrite`
//! loop on an I/O thread, and the ticket completed when the last piece has settled.

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use cudarc::cufile::sys;
use spillway_runtime::{Completer, Error, IoOp};

use crate::status::{classify, io_error, IoPlace, IoReturn};

/// A part of a request: `len` bytes at `file_offset`, `mem_offset` bytes into the memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub file_offset: u64,
    pub mem_offset: usize,
    pub len: usize,
}

/// Splits `len` bytes at `offset` into pieces of at most `split_size` bytes whose boundaries
/// fall on multiples of `split_size` in the file, so that every piece but the first and last
/// starts and ends aligned whatever the request's alignment. A request of at most
/// `split_size` bytes is one piece.
pub(crate) fn split(offset: u64, len: usize, split_size: usize) -> Vec<Piece> {
    assert!(split_size > 0, "split_size must be positive");
    if len <= split_size {
        return vec![Piece {
            file_offset: offset,
            mem_offset: 0,
            len,
        }];
    }
    let s = split_size as u64;
    let end = offset + len as u64;
    let mut pieces = Vec::with_capacity(len / split_size + 2);
    let mut at = offset;
    while at < end {
        let next = ((at / s) + 1).saturating_mul(s).min(end);
        pieces.push(Piece {
            file_offset: at,
            mem_offset: (at - offset) as usize,
            len: (next - at) as usize,
        });
        at = next;
    }
    pieces
}

/// Requests in flight on one target, so that flush and close can wait for them.
#[derive(Debug, Default)]
pub(crate) struct Inflight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl Inflight {
    fn begin(&self) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    fn end(&self) {
        let mut c = self.count.lock().unwrap_or_else(|e| e.into_inner());
        *c = c.saturating_sub(1);
        if *c == 0 {
            self.idle.notify_all();
        }
    }

    /// Blocks until no request is in flight.
    pub fn wait_idle(&self) {
        let mut c = self.count.lock().unwrap_or_else(|e| e.into_inner());
        while *c > 0 {
            c = self.idle.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Requests in flight now.
    pub fn count(&self) -> usize {
        *self.count.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How one piece ended.
#[derive(Debug)]
pub(crate) enum PieceResult {
    /// All its bytes moved.
    Done(usize),
    /// Only this many moved: end of file on a read, or a write that made no progress.
    Short(usize),
    /// It failed.
    Failed(Error),
}

#[derive(Default)]
struct Tally {
    moved: u64,
    short: bool,
    error: Option<(u64, Error)>,
    completer: Option<Completer>,
}

/// A submitted request, shared by its pieces.
pub(crate) struct Request {
    op: IoOp,
    path: PathBuf,
    offset: u64,
    len: usize,
    remaining: AtomicUsize,
    tally: Mutex<Tally>,
    inflight: Arc<Inflight>,
}

impl Request {
    /// A request of `pieces` pieces, counted in flight on `inflight` until it completes.
    pub fn new(
        op: IoOp,
        path: PathBuf,
        offset: u64,
        len: usize,
        pieces: usize,
        completer: Completer,
        inflight: Arc<Inflight>,
    ) -> Arc<Request> {
        inflight.begin();
        Arc::new(Request {
            op,
            path,
            offset,
            len,
            remaining: AtomicUsize::new(pieces),
            tally: Mutex::new(Tally {
                completer: Some(completer),
                ..Tally::default()
            }),
            inflight,
        })
    }

    /// Records how the piece at `piece_offset` ended; the last one completes the ticket.
    pub fn settle(&self, piece_offset: u64, result: PieceResult) {
        {
            let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
            match result {
                PieceResult::Done(n) => t.moved += n as u64,
                PieceResult::Short(n) => {
                    t.moved += n as u64;
                    t.short = true;
                }
                PieceResult::Failed(e) => {
                    // Keep the error nearest the start of the request: deterministic, and the
                    // one a sequential transfer would have hit first.
                    let earlier = match &t.error {
                        None => true,
                        Some((at, _)) => piece_offset < *at,
                    };
                    if earlier {
                        t.error = Some((piece_offset, e));
                    }
                }
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let (result, completer) = {
            let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
            let result = if let Some((_, e)) = t.error.take() {
                Err(e)
            } else if t.short || t.moved != self.len as u64 {
                Err(Error::ShortIo {
                    op: self.op.as_str(),
                    path: self.path.clone(),
                    offset: self.offset,
                    done: t.moved,
                    wanted: self.len as u64,
                })
            } else {
                Ok(self.len)
            };
            (result, t.completer.take())
        };
        tracing::debug!(
            op = self.op.as_str(),
            offset = self.offset,
            len = self.len,
            ok = result.is_ok(),
            "cufile request complete"
        );
        self.inflight.end();
        if let Some(c) = completer {
            c.complete(result);
        }
    }
}

/// Settles its piece as failed if dropped unsettled (a panicking or dropped job), so a
/// ticket can never hang.
pub(crate) struct PieceGuard {
    request: Arc<Request>,
    file_offset: u64,
    settled: bool,
}

impl PieceGuard {
    /// The guard of the piece at `file_offset` of `request`.
    pub fn new(request: Arc<Request>, file_offset: u64) -> Self {
        PieceGuard {
            request,
            file_offset,
            settled: false,
        }
    }

    /// Settles the piece.
    pub fn settle(mut self, result: PieceResult) {
        self.settled = true;
        self.request.settle(self.file_offset, result);
    }

    /// The request's direction.
    pub fn op(&self) -> IoOp {
        self.request.op
    }
}

impl Drop for PieceGuard {
    fn drop(&mut self) {
        if !self.settled {
            self.request.settle(
                self.file_offset,
                PieceResult::Failed(Error::Abandoned(
                    "the cufile I/O thread running this request stopped before finishing it".into(),
                )),
            );
        }
    }
}

/// One piece's cuFile calls: `len` bytes between the file of `fh` at `file_offset` and memory
/// at `base + buf_offset`.
pub(crate) struct Transfer<'a> {
    pub fh: sys::CUfileHandle_t,
    pub op: IoOp,
    pub base: u64,
    pub buf_offset: usize,
    pub file_offset: u64,
    pub len: usize,
    pub path: &'a Path,
    pub host: bool,
}

impl Transfer<'_> {
    /// Moves the bytes, calling cuFile again for the remainder after a short transfer.
    ///
    /// # Safety
    /// `fh` must be a live registered handle, and `[base + buf_offset, + len)` memory that
    /// cuFile can reach (device memory of the current context, or host memory where
    /// supported), valid for the whole call (and not otherwise accessed, for a read).
    pub unsafe fn run(&self) -> PieceResult {
        let mut done = 0usize;
        while done < self.len {
            let want = self.len - done;
            let foff = (self.file_offset + done as u64) as sys::off_t;
            let boff = (self.buf_offset + done) as sys::off_t;
            let base = self.base;
            // SAFETY: the caller's contract covers the handle and the memory range; the
            // offsets stay inside [buf_offset, buf_offset + len) and were checked to fit
            // off_t at submit.
            let ret = unsafe {
                match self.op {
                    IoOp::Read => sys::cuFileRead(self.fh, base as *mut c_void, want, foff, boff),
                    IoOp::Write => sys::cuFileWrite(self.fh, base as *const c_void, want, foff, boff),
                }
            };
            let errno = if ret == -1 {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
            } else {
                0
            };
            match classify(ret, errno) {
                IoReturn::Bytes(0) => return PieceResult::Short(done),
                IoReturn::Bytes(n) => {
                    if n < want {
                        tracing::debug!(
                            wanted = want,
                            moved = n,
                            "short cuFile transfer; retrying the rest"
                        );
                    }
                    done += n.min(want);
                }
                other => {
                    return PieceResult::Failed(io_error(
                        other,
                        IoPlace {
                            op: self.op,
                            path: self.path,
                            offset: self.file_offset + done as u64,
                            len: want,
                            host: self.host,
                        },
                    ))
                }
            }
        }
        PieceResult::Done(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_runtime::ticket;

    #[test]
    fn small_requests_are_one_piece() {
        assert_eq!(
            split(12345, 100, 4096),
            vec![Piece {
                file_offset: 12345,
                mem_offset: 0,
                len: 100
            }]
        );
        assert_eq!(split(0, 4096, 4096).len(), 1);
    }

    #[test]
    fn large_requests_split_on_aligned_boundaries() {
        let p = split(0, 4 * 4096, 4096);
        assert_eq!(p.len(), 4);
        assert!(p.iter().all(|p| p.len == 4096 && p.file_offset % 4096 == 0));

        let p = split(4097, 3 * 4096, 4096);
        assert_eq!(
            p[0],
            Piece {
                file_offset: 4097,
                mem_offset: 0,
                len: 4095
            }
        );
        assert_eq!(
            p[1],
            Piece {
                file_offset: 8192,
                mem_offset: 4095,
                len: 4096
            }
        );
        assert_eq!(
            p[3],
            Piece {
                file_offset: 16384,
                mem_offset: 12287,
                len: 1
            }
        );
        assert_eq!(p.len(), 4);
    }

    #[test]
    fn pieces_cover_the_request_exactly() {
        for (offset, len, s) in [
            (0u64, 1usize << 20, 65536usize),
            (777, 1_000_003, 65536),
            (65535, 65537, 65536),
        ] {
            let p = split(offset, len, s);
            assert_eq!(p.iter().map(|p| p.len).sum::<usize>(), len);
            let mut at = offset;
            for piece in &p {
                assert_eq!(piece.file_offset, at);
                assert_eq!(piece.mem_offset as u64, at - offset);
                assert!(piece.len > 0 && piece.len <= s);
                at += piece.len as u64;
            }
            for piece in &p[1..] {
                assert_eq!(piece.file_offset % s as u64, 0);
            }
        }
    }

    fn request(len: usize, pieces: usize) -> (Arc<Request>, spillway_runtime::Ticket, Arc<Inflight>) {
        let (t, c) = ticket();
        let inflight = Arc::new(Inflight::default());
        let r = Request::new(IoOp::Read, "/x".into(), 100, len, pieces, c, inflight.clone());
        (r, t, inflight)
    }

    #[test]
    fn the_last_piece_completes_the_ticket() {
        let (r, t, inflight) = request(300, 3);
        assert_eq!(inflight.count(), 1);
        r.settle(100, PieceResult::Done(100));
        r.settle(300, PieceResult::Done(100));
        assert!(!t.is_done());
        r.settle(200, PieceResult::Done(100));
        assert_eq!(t.wait().unwrap(), 300);
        assert_eq!(inflight.count(), 0);
        inflight.wait_idle();
    }

    #[test]
    fn a_short_piece_makes_a_short_io_with_the_bytes_moved() {
        let (r, t, _) = request(300, 3);
        r.settle(100, PieceResult::Done(100));
        r.settle(200, PieceResult::Short(40));
        r.settle(300, PieceResult::Short(0));
        match t.wait() {
            Err(Error::ShortIo {
                op: "read",
                offset: 100,
                done: 140,
                wanted: 300,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_earliest_error_wins_and_a_dropped_piece_abandons() {
        let (r, t, _) = request(300, 3);
        r.settle(300, PieceResult::Failed(Error::Device("late".into())));
        r.settle(200, PieceResult::Failed(Error::Device("early".into())));
        drop(PieceGuard::new(r.clone(), 400));
        match t.wait() {
            Err(Error::Device(m)) => assert_eq!(m, "early"),
            other => panic!("{other:?}"),
        }
        let (r, t, _) = request(10, 1);
        drop(PieceGuard::new(r, 100));
        assert!(matches!(t.wait(), Err(Error::Abandoned(_))));
    }
}
