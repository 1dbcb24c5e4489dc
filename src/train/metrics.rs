//! Per-epoch training metrics, one JSON object per line (`metrics.jsonl`).
//!
//! Every line has all keys of [`EpochMetrics`]; a value that is not known (e.g. the loss
//! of epoch 0, the untrained encoder) is JSON `null`:
//!
//! ```text
//! {"epoch":0,"loss":null,"contrast_acc":null,"knn_top1":0.11,"images_per_sec":null,"seconds":1.5,"lr":null}
//! {"epoch":1,"loss":6.9,"contrast_acc":0.02,"knn_top1":0.18,"images_per_sec":2100.0,"seconds":24.0,"lr":0.03}
//! ```
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The file name [`MetricsLog`] writes in its directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// The metrics of one epoch.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    /// The epoch, counted from 1; 0 is the untrained encoder (no training loss yet).
    pub epoch: usize,
    /// Mean InfoNCE loss over the epoch.
    pub loss: Option<f64>,
    /// Mean contrastive top-1 accuracy over the epoch, in `[0, 1]`.
    pub contrast_acc: Option<f64>,
    /// kNN monitor top-1 accuracy, in `[0, 1]`.
    pub knn_top1: Option<f64>,
    /// Training throughput in images per second.
    pub images_per_sec: Option<f64>,
    /// Wall time of the epoch in seconds (training + evaluation).
    pub seconds: f64,
    /// Learning rate used in the epoch (at its end, for a schedule that changes within it).
    pub lr: Option<f64>,
}

impl EpochMetrics {
    /// Metrics of `epoch` with only the wall time known.
    ///
    /// ```
    /// let m = moco::train::metrics::EpochMetrics::new(0, 1.5);
    /// assert_eq!(m.loss, None);
    /// ```
    pub fn new(epoch: usize, seconds: f64) -> EpochMetrics {
        EpochMetrics {
            epoch,
            loss: None,
            contrast_acc: None,
            knn_top1: None,
            images_per_sec: None,
            seconds,
            lr: None,
        }
    }

    /// Errors if a value is not finite (JSON cannot hold NaN or infinities).
    fn check(&self) -> Result<()> {
        let fields = [
            ("loss", self.loss),
            ("contrast_acc", self.contrast_acc),
            ("knn_top1", self.knn_top1),
            ("images_per_sec", self.images_per_sec),
            ("seconds", Some(self.seconds)),
            ("lr", self.lr),
        ];
        for (name, v) in fields {
            if let Some(v) = v {
                if !v.is_finite() {
                    return Err(Error::invalid(format!(
                        "epoch {}: {name} = {v} is not finite and cannot be logged",
                        self.epoch
                    )));
                }
            }
        }
        Ok(())
    }
}

/// An append-only log of [`EpochMetrics`] in `dir/metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    records: Vec<EpochMetrics>,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl`, creating `dir` if needed.
    ///
    /// With `resume = false` the file is truncated. With `resume = true` the lines of
    /// epochs `< keep_below_epoch` are kept (and returned by [`records`](Self::records))
    /// and later ones are dropped, since a resumed run writes them again; a missing file
    /// is fine. On resume, a last line without its newline (a write cut short by a crash)
    /// is dropped; any other malformed line is an error naming the file and line.
    ///
    /// ```
    /// use moco::train::metrics::{EpochMetrics, MetricsLog};
    /// let dir = tempfile::tempdir().unwrap();
    /// let mut log = MetricsLog::open(dir.path(), false, 0).unwrap();
    /// for epoch in 0..3 {
    ///     log.append(&EpochMetrics::new(epoch, 1.0)).unwrap();
    /// }
    /// // Resume from the checkpoint after epoch 1: epoch 2 will be run again.
    /// let log = MetricsLog::open(dir.path(), true, 2).unwrap();
    /// assert_eq!(log.records().len(), 2);
    /// ```
    pub fn open(dir: &Path, resume: bool, keep_below_epoch: usize) -> Result<MetricsLog> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(METRICS_FILE);
        let mut records = Vec::new();
        if resume {
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    // Drop a final line cut short by a crash.
                    let complete = match text.rfind('\n') {
                        Some(i) => &text[..=i],
                        None => "",
                    };
                    records = parse_lines(&path, complete)?;
                    records.retain(|m| m.epoch < keep_below_epoch);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&path, e)),
            }
            let mut text = String::new();
            for m in &records {
                text.push_str(&to_line(m)?);
            }
            super::checkpoint::write_atomic(&path, text.as_bytes())?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        if !resume {
            file.set_len(0).map_err(|e| Error::io(&path, e))?;
        }
        Ok(MetricsLog {
            path,
            file,
            records,
        })
    }

    /// Appends one line for `m` and flushes it. Errors (writing nothing) if a value is NaN
    /// or infinite, which JSON cannot represent.
    pub fn append(&mut self, m: &EpochMetrics) -> Result<()> {
        let line = to_line(m)?;
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))?;
        self.records.push(m.clone());
        Ok(())
    }

    /// Every record in the log: those kept on open, then those appended.
    pub fn records(&self) -> &[EpochMetrics] {
        &self.records
    }

    /// The path of the log file (`dir/metrics.jsonl`).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn to_line(m: &EpochMetrics) -> Result<String> {
    m.check()?;
    let mut line =
        serde_json::to_string(m).map_err(|e| Error::Other(format!("serializing metrics: {e}")))?;
    line.push('\n');
    Ok(line)
}

fn parse_lines(path: &Path, text: &str) -> Result<Vec<EpochMetrics>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let m = serde_json::from_str(line).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            message: format!("line {}: {e}", i + 1),
        })?;
        out.push(m);
    }
    Ok(out)
}

/// Reads a metrics file written by [`MetricsLog`]; blank lines are skipped.
///
/// Errors naming the file, and the line (counted from 1) for a malformed one.
///
/// ```
/// use moco::train::metrics::{read_metrics, EpochMetrics, MetricsLog};
/// let dir = tempfile::tempdir().unwrap();
/// let mut log = MetricsLog::open(dir.path(), false, 0).unwrap();
/// log.append(&EpochMetrics { loss: Some(6.5), ..EpochMetrics::new(1, 2.0) }).unwrap();
/// assert_eq!(read_metrics(log.path()).unwrap(), log.records());
/// ```
pub fn read_metrics(path: &Path) -> Result<Vec<EpochMetrics>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_lines(path, &text)
}
