//! Checkpoints: named `f32` tensors in a [safetensors] file with a JSON metadata blob.
//!
//! The files are standard safetensors (little-endian `F32`, tensor names as given), so
//! Python's `safetensors.torch.load_file` reads them, and torchvision-style names such as
//! `layer1.0.conv1.weight` can be used to exchange weights with PyTorch. The optional
//! metadata is stored as one JSON string under the key `"moco"` of the safetensors
//! `__metadata__` map.
//!
//! Writes are atomic: see [`write_tensors`].
//!
//! [safetensors]: https://github.com/huggingface/safetensors
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::error::{Error, Result};

/// The key of the safetensors `__metadata__` map under which the JSON metadata is stored.
pub const METADATA_KEY: &str = "moco";

/// The key of the safetensors `__metadata__` map that holds the checksums: a JSON object
/// `{"tensors": {name: crc32}, "metadata": crc32}` with each CRC-32 (IEEE) as 8 lowercase
/// hex digits, over a tensor's little-endian bytes and over the metadata's JSON string.
pub const CHECKSUM_KEY: &str = "moco.crc32";

/// CRC-32 of `bytes` as 8 lowercase hex digits.
fn crc_hex(bytes: &[u8]) -> String {
    format!("{:08x}", crc32fast::hash(bytes))
}

fn tensor_bytes(data: &[f32]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(data.len() * 4);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes
}

/// A named, dense, row-major `f32` tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The tensor's name, unique within a file (e.g. `layer1.0.conv1.weight`).
    pub name: String,
    /// The shape; empty for a scalar (which then holds one value).
    pub shape: Vec<usize>,
    /// The values in row-major order; `data.len()` must equal the product of `shape`.
    pub data: Vec<f32>,
}

impl Tensor {
    /// Creates a tensor; checks that `data.len()` equals the product of `shape`.
    ///
    /// ```
    /// use moco::train::checkpoint::Tensor;
    /// let t = Tensor::new("fc.bias", vec![2], vec![0.5, -0.5]).unwrap();
    /// assert_eq!(t.shape, [2]);
    /// assert!(Tensor::new("fc.bias", vec![3], vec![0.5]).is_err());
    /// ```
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor> {
        let t = Tensor {
            name: name.into(),
            shape,
            data,
        };
        t.check()?;
        Ok(t)
    }

    /// The number of elements the shape calls for, or `None` on overflow.
    fn numel(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }

    /// The index and value of the first element that is NaN or infinite, if any.
    ///
    /// ```
    /// use moco::train::checkpoint::Tensor;
    /// let t = Tensor::new("w", vec![3], vec![1.0, f32::NAN, 2.0]).unwrap();
    /// assert_eq!(t.first_non_finite().map(|(i, _)| i), Some(1));
    /// ```
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        self.data
            .iter()
            .position(|v| !v.is_finite())
            .map(|i| (i, self.data[i]))
    }

    fn check(&self) -> Result<()> {
        if self.name.is_empty() {
            return Err(Error::invalid("tensor name is empty"));
        }
        match self.numel() {
            Some(n) if n == self.data.len() => Ok(()),
            Some(n) => Err(Error::invalid(format!(
                "tensor {:?}: shape {:?} needs {n} values but data has {}",
                self.name,
                self.shape,
                self.data.len()
            ))),
            None => Err(Error::invalid(format!(
                "tensor {:?}: shape {:?} overflows usize",
                self.name, self.shape
            ))),
        }
    }
}

/// A [`View`] of a [`Tensor`] as little-endian `F32` bytes.
struct F32View<'a>(&'a Tensor);

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(tensor_bytes(&self.0.data))
    }
    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

/// Writes named `f32` tensors and optional JSON metadata to a safetensors file.
///
/// Atomic: the bytes go to `<path>.tmp` in the same directory (e.g. `ckpt.safetensors.tmp`),
/// which is fsynced and renamed over `path`; then the directory is fsynced. An existing
/// file at `path` stays intact if anything fails: arguments are validated (names unique
/// and non-empty, `data.len()` equal to the product of `shape`) before any file is touched,
/// and a failed write removes the temporary file.
///
/// In the file the tensors are ordered by name (safetensors' own rule); the metadata is
/// stored as a JSON string under the key [`METADATA_KEY`] of `__metadata__`, and a CRC-32
/// of every tensor and of the metadata under [`CHECKSUM_KEY`], which [`read_tensors`]
/// verifies.
///
/// ```
/// use moco::train::checkpoint::{read_tensors, write_tensors, Tensor};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("encoder.safetensors");
/// let tensors = vec![
///     Tensor::new("layer1.0.conv1.weight", vec![2, 1, 1, 1], vec![1.0, 2.0]).unwrap(),
///     Tensor::new("step", vec![], vec![7.0]).unwrap(),
/// ];
/// let meta = serde_json::json!({ "epoch": 3, "arch": "resnet18" });
/// write_tensors(&path, &tensors, Some(&meta)).unwrap();
///
/// let (back, meta_back) = read_tensors(&path).unwrap();
/// assert_eq!(back, tensors); // sorted by name
/// assert_eq!(meta_back, Some(meta));
/// ```
pub fn write_tensors(
    path: &Path,
    tensors: &[Tensor],
    meta: Option<&serde_json::Value>,
) -> Result<()> {
    let mut names = HashSet::with_capacity(tensors.len());
    for t in tensors {
        t.check()
            .map_err(|e| Error::invalid(format!("{}: {}", path.display(), strip_invalid(e))))?;
        if !names.insert(t.name.as_str()) {
            return Err(Error::invalid(format!(
                "{}: duplicate tensor name {:?}",
                path.display(),
                t.name
            )));
        }
    }
    let mut info = HashMap::new();
    let mut sums = serde_json::Map::new();
    for t in tensors {
        sums.insert(t.name.clone(), crc_hex(&tensor_bytes(&t.data)).into());
    }
    let mut checksums = serde_json::json!({ "tensors": sums });
    if let Some(m) = meta {
        let s = serde_json::to_string(m)
            .map_err(|e| Error::invalid(format!("{}: metadata: {e}", path.display())))?;
        checksums["metadata"] = crc_hex(s.as_bytes()).into();
        info.insert(METADATA_KEY.to_string(), s);
    }
    info.insert(CHECKSUM_KEY.to_string(), checksums.to_string());
    let info = Some(info);
    let bytes = safetensors::serialize(tensors.iter().map(|t| (t.name.as_str(), F32View(t))), info)
        .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

fn strip_invalid(e: Error) -> String {
    match e {
        Error::InvalidArgument(m) => m,
        other => other.to_string(),
    }
}

/// Reads the tensors and metadata written by [`write_tensors`] (or any safetensors file
/// whose tensors are all `F32`).
///
/// The tensors come back sorted by name (byte-wise), which is also their order in files
/// written by [`write_tensors`]. The metadata is the JSON value stored under
/// [`METADATA_KEY`] in `__metadata__`, or `None` if there is none; other metadata keys are
/// ignored.
///
/// Integrity: when the file carries checksums ([`CHECKSUM_KEY`], as every file written by
/// [`write_tensors`] does), every tensor and the metadata are verified against them; a
/// file with moco metadata but no checksums is refused (moco always writes them). Files
/// from elsewhere (no moco metadata, no checksums) are read as they are.
///
/// Errors (never panics), naming the file, when it is missing or unreadable
/// ([`Error::Io`]), or truncated, corrupt, holds a non-`F32` tensor, a tensor whose byte
/// length does not match its shape, metadata that is not valid JSON, or a tensor or
/// metadata that fails its checksum (naming the tensor) ([`Error::Data`]).
///
/// ```
/// use moco::train::checkpoint::read_tensors;
/// let dir = tempfile::tempdir().unwrap();
/// let err = read_tensors(&dir.path().join("missing.safetensors")).unwrap_err();
/// assert!(err.to_string().contains("missing.safetensors"));
/// ```
pub fn read_tensors(path: &Path) -> Result<(Vec<Tensor>, Option<serde_json::Value>)> {
    // Any size a disk holds: the header and every tensor are bounds-checked below.
    let bytes = crate::fsio::read_regular(path, u64::MAX, "checkpoint")?;
    let data_err = |message: String| Error::Data {
        path: path.to_path_buf(),
        message,
    };
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| data_err(format!("not a valid safetensors file: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| data_err(format!("not a valid safetensors file: {e}")))?;

    let stored = header.metadata().as_ref();
    let sums: Option<serde_json::Value> = match stored.and_then(|m| m.get(CHECKSUM_KEY)) {
        Some(s) => Some(serde_json::from_str(s).map_err(|e| {
            data_err(format!(
                "checksums {CHECKSUM_KEY:?} are not valid JSON: {e}"
            ))
        })?),
        None => None,
    };
    let meta_text = stored.and_then(|m| m.get(METADATA_KEY));
    if sums.is_none() && meta_text.is_some() {
        return Err(data_err(format!(
            "the file has moco metadata but no checksums ({CHECKSUM_KEY:?}): it was not written whole by moco, or by an older moco that did not write checksums; it cannot be verified"
        )));
    }
    let tensor_sum = |name: &str| -> Result<Option<&str>> {
        match &sums {
            None => Ok(None),
            Some(s) => s
                .get("tensors")
                .and_then(|t| t.get(name))
                .and_then(|v| v.as_str())
                .map(Some)
                .ok_or_else(|| data_err(format!("tensor {name:?} has no checksum"))),
        }
    };
    if let (Some(s), Some(text)) = (&sums, meta_text) {
        let want = s.get("metadata").and_then(|v| v.as_str());
        let got = crc_hex(text.as_bytes());
        if want != Some(got.as_str()) {
            return Err(data_err(format!(
                "the metadata fails its checksum (stored {}, computed {got}): the file is corrupt",
                want.unwrap_or("none")
            )));
        }
    }
    if let Some(n) = sums
        .as_ref()
        .and_then(|s| s.get("tensors"))
        .and_then(|t| t.as_object())
        .map(|t| t.len())
    {
        if n != st.len() {
            return Err(data_err(format!(
                "the checksums list {n} tensors but the file holds {}: the file is corrupt",
                st.len()
            )));
        }
    }

    let mut tensors = Vec::with_capacity(st.len());
    for (name, view) in st.iter() {
        if view.dtype() != Dtype::F32 {
            return Err(data_err(format!(
                "tensor {name:?} has dtype {:?}; only F32 is supported",
                view.dtype()
            )));
        }
        let shape = view.shape().to_vec();
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| data_err(format!("tensor {name:?}: shape {shape:?} overflows")))?;
        let raw = view.data();
        if numel.checked_mul(4) != Some(raw.len()) {
            return Err(data_err(format!(
                "tensor {name:?}: shape {shape:?} needs {numel} values but has {} bytes",
                raw.len()
            )));
        }
        if let Some(want) = tensor_sum(name)? {
            let got = crc_hex(raw);
            if want != got {
                return Err(data_err(format!(
                    "tensor {name:?} fails its checksum (stored {want}, computed {got}): the file is corrupt; use an intact copy"
                )));
            }
        }
        let data = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tensors.push(Tensor {
            name: name.to_string(),
            shape,
            data,
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));

    let meta =
        match meta_text {
            Some(s) => Some(serde_json::from_str(s).map_err(|e| {
                data_err(format!("metadata {METADATA_KEY:?} is not valid JSON: {e}"))
            })?),
            None => None,
        };
    Ok((tensors, meta))
}

/// `<path>.tmp`, in the same directory as `path`.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `bytes` to `path` atomically: `<path>.tmp` is written and fsynced, renamed over
/// `path`, and the directory is fsynced. On failure the temporary file is removed and an
/// existing `path` is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.file_name().is_none() {
        return Err(Error::invalid(format!(
            "{}: not a file path",
            path.display()
        )));
    }
    let tmp = tmp_path(path);
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    sync_dir(path)
}

/// Makes `dst` the same file as `src`, atomically: a hard link (or, where the file system
/// has none, a copy) to `<dst>.tmp` is renamed over `dst`, and the directory is fsynced.
/// `src` is not changed; an existing `dst` stays intact if anything fails.
pub fn link_atomic(src: &Path, dst: &Path) -> Result<()> {
    if dst.file_name().is_none() {
        return Err(Error::invalid(format!(
            "{}: not a file path",
            dst.display()
        )));
    }
    let tmp = tmp_path(dst);
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(src, &tmp).is_err() {
        let copy = || -> std::io::Result<()> {
            std::fs::copy(src, &tmp)?;
            File::open(&tmp)?.sync_all()
        };
        if let Err(e) = copy() {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&tmp, e));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, dst) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(dst, e));
    }
    sync_dir(dst)
}

/// Fsyncs the directory holding `path` so that a rename into it is durable.
#[cfg(unix)]
fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Directories cannot be fsynced portably outside Unix; the rename is still atomic.
#[cfg(not(unix))]
fn sync_dir(_path: &Path) -> Result<()> {
    Ok(())
}
