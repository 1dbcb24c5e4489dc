//! Hostile data files (issue 13): small files that describe huge images or inflate to
//! gigabytes must be errors naming the file, fast, and with bounded memory. This binary
//! counts every allocation (a global allocator that records the peak), and its tests run
//! one at a time so each measures only itself.
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use moco::data::{folder, idx};
use moco::Error;

struct Peak;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Peak = Peak;

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `f` alone and returns its result and the peak of the bytes allocated meanwhile
/// above what was allocated before.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

const MIB: usize = 1 << 20;

#[track_caller]
fn assert_data_err<T: std::fmt::Debug>(r: moco::Result<T>, file: &Path, needle: &str) {
    match r {
        Err(Error::Data { path, message }) => {
            assert_eq!(path, file, "error names the wrong file: {message}");
            assert!(
                message.contains(needle),
                "message {message:?} lacks {needle:?}"
            );
        }
        other => panic!(
            "expected a Data error about {}, got {other:?}",
            file.display()
        ),
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}

/// A valid 8-bit grayscale PNG of `w x h` black pixels, written without holding the
/// pixels in memory (rows are streamed into the zlib encoder): a few hundred KB at most.
fn black_png(path: &Path, w: u32, h: u32) {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit grey, deflate, no filter, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    let mut left = (w as u64 + 1) * h as u64; // a filter byte and w pixels per row, all 0
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        z.write_all(&zeros[..n]).unwrap();
        left -= n as u64;
    }
    chunk(&mut out, b"IDAT", &z.finish().unwrap());
    chunk(&mut out, b"IEND", &[]);
    std::fs::write(path, out).unwrap();
}

/// One class folder holding `name`, for [`folder::load`].
fn one_image_folder(root: &Path, name: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(root.join("a")).unwrap();
    root.join("a").join(name)
}

/// Issue 13 item 2: 1 x 4,194,304 made the loader allocate 12.9 GB and abort; 2^27 x 1
/// tried 64 GiB; 1 x 2^27 panicked (the resized height overflowed u32).
#[test]
fn huge_thin_pngs_are_errors_with_bounded_memory() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (w, h) in [(1u32, 4_194_304u32), (1 << 27, 1), (1, 1 << 27)] {
        let dir = tempfile::tempdir().unwrap();
        let file = one_image_folder(dir.path(), "thin.png");
        black_png(&file, w, h);
        let size = std::fs::metadata(&file).unwrap().len();
        assert!(size < 1 << 20, "{w}x{h}: the test file is {size} bytes");
        for image_size in [32, 224] {
            let (r, peak) = peak_of(|| folder::load(dir.path(), true, image_size));
            assert_data_err(r, &file, &format!("{w}x{h}"));
            assert!(peak < 64 * MIB, "{w}x{h}: {peak} bytes allocated");
        }
    }
}

/// An image within the decoder's limits whose aspect ratio, or whose size after the
/// resize, is out of bounds.
#[test]
fn extreme_aspect_ratio_and_resize_are_errors() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let file = one_image_folder(dir.path(), "strip.png");
    black_png(&file, 2, 1000); // 500:1
    let (r, peak) = peak_of(|| folder::load(dir.path(), true, 64));
    assert_data_err(r, &file, "aspect ratio");
    assert!(peak < 16 * MIB, "{peak} bytes allocated");
    // 64:1 is allowed at a small size ...
    black_png(&file, 64, 4096);
    assert_eq!(folder::load(dir.path(), true, 16).unwrap().len(), 1);
    // ... but not at 4096, where the resized image would be 4096 x 262144.
    let (r, peak) = peak_of(|| folder::load(dir.path(), true, 4096));
    assert_data_err(r, &file, "4096x262144");
    assert!(peak < 16 * MIB, "{peak} bytes allocated");
}

#[test]
fn resize_target_arithmetic_does_not_overflow() {
    let p = Path::new("x.png");
    assert_eq!(folder::resize_target(p, 40, 20, 8).unwrap(), (16, 8));
    assert_eq!(folder::resize_target(p, 20, 40, 8).unwrap(), (8, 16));
    assert_eq!(folder::resize_target(p, 3, 5, 2).unwrap(), (2, 3)); // 3.33 rounds to 3
    assert_eq!(folder::resize_target(p, 2, 5, 2).unwrap(), (2, 5));
    assert_eq!(folder::resize_target(p, 7, 7, 7).unwrap(), (7, 7));
    for (w, h) in [(1, u32::MAX), (u32::MAX, 1), (u32::MAX, u32::MAX), (0, 5)] {
        for s in [1, 224, 4096, usize::MAX >> 40] {
            let _ = folder::resize_target(p, w, h, s); // never panics
        }
    }
    assert_eq!(
        folder::resize_target(p, u32::MAX, u32::MAX, 4096).unwrap(),
        (4096, 4096)
    );
    assert!(folder::resize_target(p, 64, 4096, 4096).is_err());
    assert!(folder::resize_target(p, 1, u32::MAX, 1).is_err());
}

fn idx_header(dims: &[u32]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v
}

/// `header` then `zeros` zero bytes, gzipped, streamed (the zeros are never in memory).
fn gz_bomb(path: &Path, header: &[u8], zeros: u64) {
    let f = std::fs::File::create(path).unwrap();
    let mut e =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(f), flate2::Compression::best());
    e.write_all(header).unwrap();
    let block = vec![0u8; 1 << 20];
    let mut left = zeros;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        e.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    e.finish().unwrap().flush().unwrap();
}

/// Issue 13 item 10: a small `.gz` inflating to gigabytes was inflated whole before its
/// header was checked. Now only the header, or the bytes it promises, are inflated.
#[test]
fn gzip_bomb_is_rejected_after_its_header() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let bomb = dir.path().join("train-images-idx3-ubyte.gz");
    // 256 MiB of zeros: a wrong element type in the first 4 bytes ...
    gz_bomb(&bomb, &[], 256 << 20);
    assert!(std::fs::metadata(&bomb).unwrap().len() < 1 << 20);
    let t0 = std::time::Instant::now();
    let (r, peak) = peak_of(|| idx::read_idx(&bomb));
    assert_data_err(r, &bomb, "element type 0x00");
    assert!(peak < 8 * MIB, "{peak} bytes allocated");
    // ... or a valid header of 10 images of 28x28, then the zeros.
    gz_bomb(&bomb, &idx_header(&[10, 28, 28]), 256 << 20);
    let (r, peak) = peak_of(|| idx::read_idx(&bomb));
    assert_data_err(r, &bomb, "trailing data");
    assert!(peak < 8 * MIB, "{peak} bytes allocated");
    assert!(t0.elapsed().as_secs() < 10, "took {:?}", t0.elapsed());
    // A header that promises more than the limit is refused before any data is read.
    gz_bomb(&bomb, &idx_header(&[u32::MAX, u32::MAX, 4]), 0);
    assert_data_err(idx::read_idx(&bomb), &bomb, "more than");
    // A plain file that promises 4 GiB but holds 100 bytes: checked against its length.
    let plain = dir.path().join("plain-idx3-ubyte");
    let mut b = idx_header(&[1 << 16, 1 << 8, 1 << 8]);
    b.extend_from_slice(&[0; 100]);
    std::fs::write(&plain, &b).unwrap();
    let (r, peak) = peak_of(|| idx::read_idx(&plain));
    assert_data_err(r, &plain, "truncated");
    assert!(peak < MIB, "{peak} bytes allocated");
    // The same, gzipped: the data is read as it comes, not allocated up front.
    let gzp = dir.path().join("short.gz");
    gz_bomb(&gzp, &b, 0);
    let (r, peak) = peak_of(|| idx::read_idx(&gzp));
    assert_data_err(r, &gzp, "truncated");
    assert!(peak < 32 * MIB, "{peak} bytes allocated");
}

/// `read_idx_from` on an endless stream reads the header, the promised bytes and one more.
#[test]
fn idx_stream_reads_only_what_the_header_promises() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    struct Endless<'a>(&'a mut u64);
    impl std::io::Read for Endless<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            buf.fill(0);
            *self.0 += buf.len() as u64;
            Ok(buf.len())
        }
    }
    let mut n = 0u64;
    let header = idx_header(&[2, 3]);
    let r = idx::read_idx_from(
        Path::new("s"),
        std::io::Read::chain(&header[..], Endless(&mut n)),
        None,
    );
    assert!(matches!(r, Err(Error::Data { .. })), "{r:?}");
    assert!(n <= 16 * 1024, "read {n} bytes past the header");
}
