//! Training configuration: presets, overrides, TOML/JSON files.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::augment::Preset;
use crate::data::folder::BadImages;
use crate::data::DatasetKind;
use crate::error::{Error, Result};
use crate::model::Arch;
use crate::ops::InfoNceImpl;

/// Learning-rate decay after the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Half a cosine from the base rate to zero over the run (per epoch, as the seed).
    Cosine,
    /// The base rate times 0.1 at each of the `milestones`.
    Step,
    /// The base rate throughout.
    Constant,
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::Cosine => "cosine",
            Schedule::Step => "step",
            Schedule::Constant => "constant",
        })
    }
}

impl std::str::FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cosine" => Ok(Schedule::Cosine),
            "step" => Ok(Schedule::Step),
            "constant" => Ok(Schedule::Constant),
            _ => Err(Error::invalid(format!(
                "--schedule must be cosine, step or constant, got {s:?}"
            ))),
        }
    }
}

serde_via_str!(Schedule);

/// The presets a run starts from ([`TrainConfig::preset`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunPreset {
    /// resnet8 on the synthetic set, minutes on two CPU cores.
    Demo,
    /// MoCo v1 (He et al.).
    V1,
    /// MoCo v2.
    V2,
    /// The official CIFAR-10 demo.
    Cifar,
}

impl std::fmt::Display for RunPreset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunPreset::Demo => "demo",
            RunPreset::V1 => "v1",
            RunPreset::V2 => "v2",
            RunPreset::Cifar => "cifar",
        })
    }
}

impl std::str::FromStr for RunPreset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "demo" => Ok(RunPreset::Demo),
            "v1" => Ok(RunPreset::V1),
            "v2" => Ok(RunPreset::V2),
            "cifar" => Ok(RunPreset::Cifar),
            other => Err(Error::invalid(format!(
                "unknown preset {other:?}: use demo, v1, v2 or cifar"
            ))),
        }
    }
}

serde_via_str!(RunPreset);

/// Everything that defines a training run. Saved as `config.json` in the run directory.
///
/// ```
/// use moco::train::TrainConfig;
/// let c = TrainConfig::preset("cifar").unwrap();
/// assert_eq!((c.moco_k, c.moco_m, c.moco_t, c.bn_splits), (4096, 0.99, 0.1, 8));
/// let demo = TrainConfig::default(); // what `moco train` runs with no arguments
/// assert_eq!(demo.dataset, moco::data::DatasetKind::Synthetic);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Preset the values started from (`demo`, `v1`, `v2`, `cifar`).
    pub preset: RunPreset,
    /// Data set: `synthetic`, `idx`, `cifar10`, `cifar100`, `folder`.
    pub dataset: DatasetKind,
    /// Directory of the data set files (not needed for `synthetic`).
    pub data: Option<PathBuf>,
    /// Side of the training views (and of stored synthetic/folder images).
    pub image_size: usize,
    /// Use only the first N training images (0 = all).
    pub train_limit: usize,
    /// Use only the first N test images for the kNN monitor (0 = all).
    pub test_limit: usize,
    /// Backbone: `resnet8`, `resnet20`, `resnet18-cifar`, `resnet18`, `resnet50`.
    pub arch: Arch,
    /// MLP head (MoCo v2) instead of a linear one.
    pub mlp: bool,
    /// Feature dimension C of the head output.
    pub dim: usize,
    /// Augmentation: `v1`, `v2`, `cifar`.
    pub augment: Preset,
    /// Smallest area fraction of the random crop (`RandomResizedCrop(scale=(min, 1))`),
    /// overriding the augmentation preset's (v1/v2 0.2, cifar 0.08). `None`: the preset's.
    pub crop_scale: Option<f64>,
    /// Epochs.
    pub epochs: usize,
    /// Images per step N.
    pub batch_size: usize,
    /// Base learning rate.
    pub lr: f64,
    /// Learning-rate decay: `cosine`, `step`, `constant`.
    pub schedule: Schedule,
    /// Epochs at which a `step` schedule multiplies the rate by 0.1.
    pub milestones: Vec<usize>,
    /// Linear warmup epochs.
    pub warmup_epochs: usize,
    /// SGD momentum.
    pub sgd_momentum: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Queue length K.
    pub moco_k: usize,
    /// Key-encoder momentum m.
    pub moco_m: f64,
    /// Temperature T.
    pub moco_t: f64,
    /// Symmetric loss `loss(q1, k2) + loss(q2, k1)`.
    pub symmetric: bool,
    /// BatchNorm groups emulating shuffle-BN on one device (1 = plain BatchNorm).
    pub bn_splits: usize,
    /// Seed of everything random.
    pub seed: u64,
    /// `auto`, `cpu`, `cuda`, `cuda:N` (`auto` resolved where the run starts).
    pub device: crate::DeviceSpec,
    /// CPU threads (0 = all cores).
    pub threads: usize,
    /// Data-loading worker threads.
    pub workers: usize,
    /// kNN monitor: neighbours.
    pub knn_k: usize,
    /// kNN monitor: temperature.
    pub knn_t: f32,
    /// Run the kNN monitor every this many epochs (0 = never; epoch 0 and the last always).
    pub knn_every: usize,
    /// InfoNCE on the GPU: `fused` or `unfused`.
    pub infonce: InfoNceImpl,
    /// Convolutions on the GPU: `im2col` (SGEMM), `cudnn`, or `auto` (cuDNN when it
    /// loads, else im2col).
    pub conv: crate::backend::cuda::ConvBackend,
    /// TF32 tensor cores for GPU convolutions and GEMMs (off: real fp32, as PyTorch with
    /// TF32 off).
    pub tf32: bool,
    /// Image folders: what to do with an image that cannot be decoded: `error` (stop,
    /// naming it) or `skip` (leave it out, report each and the count).
    pub bad_images: BadImages,
}

impl Default for TrainConfig {
    /// The `demo` preset: a small run on the built-in data set that finishes in minutes on
    /// two CPU cores and visibly improves the kNN accuracy.
    fn default() -> Self {
        TrainConfig {
            preset: RunPreset::Demo,
            dataset: DatasetKind::Synthetic,
            data: None,
            image_size: 32,
            train_limit: 0,
            test_limit: 0,
            arch: Arch::Resnet8,
            mlp: true,
            dim: 64,
            augment: Preset::Cifar,
            crop_scale: None,
            epochs: 15,
            batch_size: 64,
            lr: 0.06,
            schedule: Schedule::Cosine,
            milestones: vec![],
            warmup_epochs: 0,
            sgd_momentum: 0.9,
            weight_decay: 5e-4,
            moco_k: 2048,
            moco_m: 0.99,
            moco_t: 0.1,
            symmetric: false,
            bn_splits: 4,
            seed: 0,
            device: crate::DeviceSpec::Auto,
            threads: 0,
            workers: 2,
            knn_k: 200,
            knn_t: 0.1,
            knn_every: 1,
            infonce: InfoNceImpl::Fused,
            conv: crate::backend::cuda::ConvBackend::Im2col,
            tf32: false,
            bad_images: BadImages::Error,
        }
    }
}

/// The first float in `v` that is nan or infinite, with its dotted key.
fn non_finite_float(v: &toml::Value, key: &str) -> Option<(String, f64)> {
    match v {
        toml::Value::Float(f) if !f.is_finite() => Some((key.to_string(), *f)),
        toml::Value::Table(t) => t.iter().find_map(|(k, v)| {
            let full = if key.is_empty() {
                k.clone()
            } else {
                format!("{key}.{k}")
            };
            non_finite_float(v, &full)
        }),
        toml::Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, v)| non_finite_float(v, &format!("{key}[{i}]"))),
        _ => None,
    }
}

/// Largest config file read (16 MiB): a config is a few hundred bytes.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

impl TrainConfig {
    /// The named preset:
    ///
    /// * `demo` (the default): resnet8 on the synthetic set, MLP head, K = 2048, batch 64,
    ///   15 epochs: a few minutes on two CPU cores.
    /// * `v1`: MoCo v1 (He et al.): ResNet-50, linear head, K = 65536, m = 0.999,
    ///   T = 0.07, lr 0.03, wd 1e-4, 200 epochs, lr x0.1 at 120 and 160, batch 256.
    /// * `v2`: MoCo v2: as v1 with an MLP head, T = 0.2, blur augmentation, cosine schedule.
    /// * `cifar`: the official CIFAR-10 demo: resnet18-cifar, K = 4096, m = 0.99, T = 0.1,
    ///   batch 512, lr 0.06, wd 5e-4, cosine, 200 epochs, 8 BatchNorm splits.
    pub fn preset(name: &str) -> Result<TrainConfig> {
        Ok(TrainConfig::from_preset(name.parse()?))
    }

    /// The preset `p` (see [`TrainConfig::preset`]).
    pub fn from_preset(p: RunPreset) -> TrainConfig {
        let base = TrainConfig::default();
        let paper = TrainConfig {
            arch: Arch::Resnet50,
            image_size: 224,
            dim: 128,
            epochs: 200,
            batch_size: 256,
            lr: 0.03,
            weight_decay: 1e-4,
            moco_k: 65536,
            moco_m: 0.999,
            bn_splits: 8,
            ..base.clone()
        };
        match p {
            RunPreset::Demo => base,
            RunPreset::V1 => TrainConfig {
                preset: RunPreset::V1,
                mlp: false,
                augment: Preset::V1,
                moco_t: 0.07,
                schedule: Schedule::Step,
                milestones: vec![120, 160],
                ..paper
            },
            RunPreset::V2 => TrainConfig {
                preset: RunPreset::V2,
                mlp: true,
                augment: Preset::V2,
                moco_t: 0.2,
                schedule: Schedule::Cosine,
                ..paper
            },
            RunPreset::Cifar => TrainConfig {
                preset: RunPreset::Cifar,
                arch: Arch::Resnet18Cifar,
                image_size: 32,
                mlp: false,
                dim: 128,
                augment: Preset::Cifar,
                epochs: 200,
                batch_size: 512,
                lr: 0.06,
                schedule: Schedule::Cosine,
                weight_decay: 5e-4,
                moco_k: 4096,
                moco_m: 0.99,
                moco_t: 0.1,
                bn_splits: 8,
                ..base
            },
        }
    }

    /// Reads a config file (`.toml` or `.json`, at most [`MAX_CONFIG_BYTES`], a leading
    /// byte-order mark ignored); keys not in the file keep the values of
    /// the file's `preset` (default `demo`).
    pub fn load(path: &Path) -> Result<TrainConfig> {
        let bad = |m: String| Error::Data {
            path: path.to_path_buf(),
            message: m,
        };
        let bytes = crate::fsio::read_regular(path, MAX_CONFIG_BYTES, "config file")?;
        let text = String::from_utf8(bytes).map_err(|_| bad("is not UTF-8 text".into()))?;
        // A byte-order mark (as some editors write) is not part of the text.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let value: serde_json::Value = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => {
                let t: toml::Value = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
                // JSON (and so the config) cannot hold nan or inf: name the key instead of
                // failing later with "invalid type: null".
                if let Some((key, v)) = non_finite_float(&t, "") {
                    return Err(bad(format!("{key} = {v}: values must be finite numbers")));
                }
                serde_json::to_value(t).map_err(|e| bad(e.to_string()))?
            }
            Some("json") => serde_json::from_str(text).map_err(|e| bad(e.to_string()))?,
            _ => return Err(bad("config must be a .toml or .json file".into())),
        };
        let preset = value
            .get("preset")
            .and_then(|p| p.as_str())
            .unwrap_or("demo")
            .to_string();
        let mut merged =
            serde_json::to_value(TrainConfig::preset(&preset)?).map_err(|e| bad(e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| bad("config must be a table of keys".into()))?;
        for (k, v) in obj {
            merged[k] = v.clone();
        }
        let cfg: TrainConfig = serde_json::from_value(merged).map_err(|e| bad(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes `config.json` into `dir` (pretty, stable key order).
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("config.json");
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Other(e.to_string()))?;
        crate::train::write_atomic(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Checks every value; the message says which flag is wrong.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(Error::invalid(m));
        if let Some(min) = self.crop_scale {
            if !(min.is_finite() && min > 0.0 && min <= 1.0) {
                return err(format!(
                    "--crop-scale must be a finite number in (0, 1], got {min}"
                ));
            }
        }
        self.device_spec()?;
        if self.epochs == 0 {
            return err("--epochs must be >= 1".into());
        }
        if self.batch_size < 2 {
            return err(format!(
                "--batch-size must be >= 2, got {}",
                self.batch_size
            ));
        }
        if self.dim == 0 || self.image_size < 8 {
            return err(format!(
                "--dim must be >= 1 and --image-size >= 8, got {} and {}",
                self.dim, self.image_size
            ));
        }
        let keys_per_step = self.batch_size * if self.symmetric { 2 } else { 1 };
        if self.moco_k < keys_per_step {
            return err(format!(
                "--moco-k ({}) must be at least the keys enqueued per step ({keys_per_step}); K need not be a multiple of the batch",
                self.moco_k
            ));
        }
        if !(0.0..=1.0).contains(&self.moco_m) {
            return err(format!("--moco-m must be in [0, 1], got {}", self.moco_m));
        }
        // The f32 kernels see T rounded to f32: it must stay positive and finite there too.
        let t32 = self.moco_t as f32;
        if !(t32.is_finite() && t32 > 0.0 && self.moco_t.is_finite()) {
            return err(format!(
                "--moco-t must be > 0 and within f32 range, got {}",
                self.moco_t
            ));
        }
        // Every float must be finite, also once rounded to f32 for the f32 backends:
        // config.json cannot hold inf or NaN (JSON writes null), so such a run could never
        // be resumed. A JSON 1e39 is finite in f64 but infinite in f32.
        let wd32 = self.weight_decay as f32;
        if !(wd32.is_finite() && self.weight_decay >= 0.0) {
            return err(format!(
                "--wd must be a finite number >= 0, got {}",
                self.weight_decay
            ));
        }
        if !(0.0..=1.0).contains(&self.sgd_momentum) {
            return err(format!(
                "sgd_momentum must be a finite number in [0, 1], got {}",
                self.sgd_momentum
            ));
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return err(format!("--lr must be >= 0, got {}", self.lr));
        }
        if self.bn_splits == 0 || !self.batch_size.is_multiple_of(self.bn_splits) {
            return err(format!(
                "--bn-splits ({}) must divide --batch-size ({})",
                self.bn_splits, self.batch_size
            ));
        }
        if self.knn_k == 0 || !(self.knn_t.is_finite() && self.knn_t > 0.0) {
            return err("--knn-k must be >= 1 and --knn-t > 0".into());
        }
        if self.workers == 0 || self.workers > crate::data::loader::MAX_WORKERS {
            return err(format!(
                "--workers must be in 1..={}, not {}",
                crate::data::loader::MAX_WORKERS,
                self.workers
            ));
        }
        Ok(())
    }

    /// The device this config asks for (`auto` resolved on this machine).
    pub fn device_spec(&self) -> Result<crate::Device> {
        Ok(self.device.resolve())
    }

    /// The learning-rate schedule for `steps_per_epoch`.
    pub fn lr_schedule(&self, steps_per_epoch: usize) -> crate::optim::LrSchedule {
        use crate::optim::{Decay, LrSchedule};
        LrSchedule {
            base_lr: self.lr,
            epochs: self.epochs,
            steps_per_epoch,
            warmup_epochs: self.warmup_epochs,
            decay: match self.schedule {
                Schedule::Step => Decay::Step {
                    milestones: self.milestones.clone(),
                    gamma: 0.1,
                },
                Schedule::Constant => Decay::Constant,
                Schedule::Cosine => Decay::Cosine { per_step: false },
            },
        }
    }
}
