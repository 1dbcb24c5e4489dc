//! Opening inputs that a user names: only regular files, never blocking.
//!
//! A named pipe opened for reading waits for a writer; a device can be endless. Every file
//! moco reads because a user named it (checkpoint, config, data file) is opened without
//! blocking and checked to be a regular file first, so such a path is a clear error at
//! once instead of a hang.
use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// Opens `path` for reading if it is a regular file (after following links); anything
/// else (a directory, a named pipe, a socket, a device) is an error naming it.
pub(crate) fn open_regular(path: &Path) -> Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // A FIFO opened for reading would wait for a writer; non-blocking it does not
        // (reads of a regular file are not affected by the flag).
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "a named pipe, socket or device"
        };
        return Err(Error::Data {
            path: path.to_path_buf(),
            message: format!("is {kind}, not a regular file"),
        });
    }
    Ok(file)
}

/// Reads a regular file ([`open_regular`]) whole, refusing one of more than `limit` bytes
/// (checked before and while reading, in case it grows). `what` names the kind of file in
/// the error ("checkpoint", "config file").
pub(crate) fn read_regular(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let too_big = || Error::Data {
        path: path.to_path_buf(),
        message: format!("is larger than the limit for a {what} ({limit} bytes)"),
    };
    if len > limit {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_big());
    }
    Ok(bytes)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A named pipe with no writer and a directory are refused at once; a regular file
    /// reads; a file over the limit is refused.
    #[test]
    fn only_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.safetensors");
        let c = std::ffi::CString::new(fifo.as_os_str().to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let t = std::time::Instant::now();
        let e = read_regular(&fifo, 1 << 20, "checkpoint")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("named pipe") && e.contains("pipe.safetensors"),
            "{e}"
        );
        assert!(t.elapsed().as_secs() < 5, "must not wait for a writer");
        let e = read_regular(dir.path(), 1 << 20, "checkpoint")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a directory"), "{e}");
        let f = dir.path().join("ok.json");
        std::fs::write(&f, b"{}").unwrap();
        assert_eq!(read_regular(&f, 2, "config file").unwrap(), b"{}");
        let e = read_regular(&f, 1, "config file").unwrap_err().to_string();
        assert!(e.contains("limit for a config file"), "{e}");
    }
}
