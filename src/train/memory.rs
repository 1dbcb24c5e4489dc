//! What a training run needs in memory, estimated before anything large is allocated, so
//! that a config that cannot fit is refused with the estimate instead of aborting.
//!
//! The estimate is deliberately a modest lower bound (the sizes every run must hold, with
//! no allowance for allocator slack): a refused config would not have fit, and a config
//! that passes can still run out of memory near the limit, which then fails as before.
//!
//! ```
//! use moco::train::{memory, TrainConfig};
//! let cfg = TrainConfig::default(); // the demo run
//! let est = memory::estimate(&cfg, 3, 5000, 1000, 3 * 32 * 32).unwrap();
//! assert!(est.total_bytes() < 2 << 30);
//! let huge = TrainConfig { moco_k: 100_000_000_000, ..TrainConfig::default() };
//! let est = memory::estimate(&huge, 3, 5000, 1000, 3 * 32 * 32).unwrap();
//! assert!(est.queue_bytes > 10_000_000_000_000);
//! ```
use crate::error::{Error, Result};
use crate::model::Arch;
use crate::train::TrainConfig;

/// Largest batch of the feature passes (kNN monitor, linear probe); [`eval_batch`] picks
/// a smaller one where the images are large.
pub const EVAL_BATCH: u64 = 256;

/// Buffers of the largest activation that a forward pass without backward holds at its
/// peak, per image: the stem's outputs stay alive while a block holds its own (convolution,
/// BatchNorm and ReLU outputs, the shortcut). Measured: a resnet8 feature pass at 160 px and
/// batch 256 peaked at 4.98 GB RSS, 12 times its largest activation (1.64 MB per image).
pub const FEATURE_PASS_BUFFERS: u64 = 12;

/// Activation memory a feature pass may always take (1 GiB), even when the training step
/// takes less.
pub const EVAL_BUDGET_BYTES: u64 = 1 << 30;

/// The batch of the feature passes of `cfg` with `in_channels` inputs: [`EVAL_BATCH`], or
/// fewer where that many images would take more activation memory than the larger of
/// [`EVAL_BUDGET_BYTES`] and the training step's (which the memory check has let through).
/// At least 1. Inference-mode features do not depend on the batch.
///
/// ```
/// use moco::train::{memory, TrainConfig};
/// let mut cfg = TrainConfig::default(); // resnet8 at 32 px
/// cfg.batch_size = 8;
/// assert_eq!(memory::eval_batch(&cfg, 3), 256);
/// cfg.image_size = 160; // 25 times the pixels
/// assert!(memory::eval_batch(&cfg, 3) < 100);
/// ```
pub fn eval_batch(cfg: &TrainConfig, in_channels: usize) -> usize {
    let e = encoder_size(cfg.arch, in_channels, cfg.dim, cfg.mlp, cfg.image_size);
    let per_image = e
        .largest_per_image
        .saturating_mul(FEATURE_PASS_BUFFERS)
        .saturating_mul(4)
        .max(1);
    let step = step_activation_bytes(cfg, &e);
    let budget = step.max(EVAL_BUDGET_BYTES);
    (budget / per_image).clamp(1, EVAL_BATCH) as usize
}

/// Activation bytes of one training step of `cfg` (see [`estimate`]).
fn step_activation_bytes(cfg: &TrainConfig, e: &EncoderSize) -> u64 {
    let n = cfg.batch_size as u64 * if cfg.symmetric { 2 } else { 1 };
    // The query pass caches about 3 tensors per convolution output (conv, BN, ReLU) for its
    // backward pass, which holds a couple of the largest at a time.
    e.activations_per_image
        .saturating_mul(3)
        .saturating_add(e.largest_per_image.saturating_mul(2))
        .saturating_mul(n)
        .saturating_mul(4)
}

/// The sizes of one encoder, from its architecture alone (nothing allocated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderSize {
    /// Trainable parameters (the flat parameter buffer's length).
    pub params: u64,
    /// BatchNorm running statistics (mean and variance per channel).
    pub running: u64,
    /// Elements of every convolution output for one image, plus the input: the
    /// activations a forward pass caches for its backward pass are a few times this.
    pub activations_per_image: u64,
    /// Elements of the largest single convolution output (or the input) for one image: a
    /// pass that keeps nothing holds a few of these at a time.
    pub largest_per_image: u64,
    /// Width of the backbone features.
    pub feature_dim: u64,
}

/// The sizes of `arch` with `in_channels` inputs, a head of output `dim` (`mlp`: the MoCo v2
/// head), on `side` x `side` images. Saturates instead of overflowing.
pub fn encoder_size(
    arch: Arch,
    in_channels: usize,
    dim: usize,
    mlp: bool,
    side: usize,
) -> EncoderSize {
    let (in_c, dim, side) = (in_channels as u64, dim as u64, side as u64);
    let mut params = 0u64;
    let mut running = 0u64;
    let mut acts = in_c.saturating_mul(side).saturating_mul(side);
    let mut largest = acts;
    let mut h = side;
    let mut conv = |cin: u64, cout: u64, k: u64, stride: u64, h: u64| -> u64 {
        params = params.saturating_add(cout * cin * k * k + 2 * cout); // + its BatchNorm
        running += 2 * cout;
        let ho = (h + 2 * (k / 2)).saturating_sub(k) / stride + 1;
        let out = cout.saturating_mul(ho).saturating_mul(ho);
        acts = acts.saturating_add(out);
        largest = largest.max(out);
        ho
    };
    let (stem_c, stem_k, stem_s, maxpool, widths, depths, bottleneck): (
        u64,
        u64,
        u64,
        bool,
        &[u64],
        &[u64],
        bool,
    ) = match arch {
        Arch::Resnet8 => (16, 3, 1, false, &[16, 32, 64], &[1, 1, 1], false),
        Arch::Resnet20 => (16, 3, 1, false, &[16, 32, 64], &[3, 3, 3], false),
        Arch::Resnet18Cifar => (64, 3, 1, false, &[64, 128, 256, 512], &[2; 4], false),
        Arch::Resnet18 => (64, 7, 2, true, &[64, 128, 256, 512], &[2; 4], false),
        Arch::Resnet50 => (64, 7, 2, true, &[64, 128, 256, 512], &[3, 4, 6, 3], true),
    };
    h = conv(in_c, stem_c, stem_k, stem_s, h);
    if maxpool {
        h = (h + 2).saturating_sub(3) / 2 + 1;
    }
    let mut c = stem_c;
    for (li, (&width, &depth)) in widths.iter().zip(depths).enumerate() {
        for bi in 0..depth {
            let stride = if li > 0 && bi == 0 { 2 } else { 1 };
            let (cout, ho) = if bottleneck {
                let a = conv(c, width, 1, 1, h);
                let b = conv(width, width, 3, stride, a);
                (width * 4, conv(width, width * 4, 1, 1, b))
            } else {
                let a = conv(c, width, 3, stride, h);
                (width, conv(width, width, 3, 1, a))
            };
            if stride != 1 || c != cout {
                conv(c, cout, 1, stride, h);
            }
            c = cout;
            h = ho;
        }
    }
    let head = if mlp {
        (c * c + c)
            .saturating_add(c.saturating_mul(dim))
            .saturating_add(dim)
    } else {
        c.saturating_mul(dim).saturating_add(dim)
    };
    EncoderSize {
        params: params.saturating_add(head),
        running,
        activations_per_image: acts,
        largest_per_image: largest,
        feature_dim: c,
    }
}

/// The memory a run needs, by part, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Both encoders' parameters, the query gradients and the SGD momentum, and the
    /// BatchNorm statistics.
    pub model_bytes: u64,
    /// The queue of K keys of dimension C.
    pub queue_bytes: u64,
    /// Activations of one training step (query forward and backward, key forward) and of
    /// one feature-pass batch.
    pub activation_bytes: u64,
    /// The stored images of both splits (host memory).
    pub data_bytes: u64,
    /// The kNN monitor's feature bank and test features (host memory).
    pub feature_bytes: u64,
}

impl MemoryEstimate {
    /// What lives where the backend's buffers live (device memory on a GPU).
    pub fn backend_bytes(&self) -> u64 {
        self.model_bytes
            .saturating_add(self.queue_bytes)
            .saturating_add(self.activation_bytes)
    }
    /// What always lives in host memory.
    pub fn host_only_bytes(&self) -> u64 {
        self.data_bytes.saturating_add(self.feature_bytes)
    }
    /// Everything.
    pub fn total_bytes(&self) -> u64 {
        self.backend_bytes().saturating_add(self.host_only_bytes())
    }
}

/// Estimates what `cfg` needs with `in_channels` inputs, `train_images` and `test_images`
/// images in the splits, each `image_bytes` bytes as stored.
pub fn estimate(
    cfg: &TrainConfig,
    in_channels: usize,
    train_images: u64,
    test_images: u64,
    image_bytes: u64,
) -> Result<MemoryEstimate> {
    let arch: Arch = cfg.arch;
    let e = encoder_size(arch, in_channels, cfg.dim, cfg.mlp, cfg.image_size);
    let f = 4u64; // f32
                  // params of f_q and f_k, gradients, momentum; running statistics of both.
    let model = e
        .params
        .saturating_mul(4 * f)
        .saturating_add(e.running.saturating_mul(2 * f));
    let queue = (cfg.moco_k as u64)
        .saturating_mul(cfg.dim as u64)
        .saturating_mul(f);
    // The training step, or a feature pass at its batch (whichever is larger).
    let step = step_activation_bytes(cfg, &e);
    let eval = e
        .largest_per_image
        .saturating_mul(FEATURE_PASS_BUFFERS)
        .saturating_mul(eval_batch(cfg, in_channels) as u64)
        .saturating_mul(f);
    let acts = step.max(eval);
    let images = train_images.saturating_add(test_images);
    Ok(MemoryEstimate {
        model_bytes: model,
        queue_bytes: queue,
        activation_bytes: acts,
        data_bytes: images.saturating_mul(image_bytes),
        feature_bytes: images.saturating_mul(e.feature_dim).saturating_mul(f),
    })
}

/// Bytes of host memory this process can still use: the least of the system's available
/// memory (`MemAvailable`), the address-space limit (`ulimit -v`) less what is mapped, and
/// the cgroup's limit less its usage. `None` where none of these can be read.
pub fn host_available_bytes() -> Option<u64> {
    let mut best: Option<u64> = None;
    let mut take = |v: u64| best = Some(best.map_or(v, |b| b.min(v)));
    let kib_field = |text: &str, key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line[key.len()..]
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    };
    if let Ok(text) = std::fs::read_to_string("/proc/meminfo") {
        if let Some(v) = kib_field(&text, "MemAvailable:") {
            take(v);
        }
    }
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit struct through a valid pointer to a local.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) };
        if rc == 0 && lim.rlim_cur != libc::RLIM_INFINITY {
            let mapped = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|t| kib_field(&t, "VmSize:"))
                .unwrap_or(0);
            #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every platform
            let cur = lim.rlim_cur as u64;
            take(cur.saturating_sub(mapped));
        }
    }
    let cg = |f: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    };
    if let (Some(max), Some(cur)) = (cg("memory.max"), cg("memory.current")) {
        take(max.saturating_sub(cur));
    }
    best
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Refuses `est` when it cannot fit: in host memory (`host_free`, everything on the CPU
/// backend) and, on a GPU, in `device_free`. The message gives the estimate by part.
pub fn check_fits(
    est: &MemoryEstimate,
    host_free: Option<u64>,
    device_free: Option<u64>,
) -> Result<()> {
    let parts = format!(
        "model {}, queue {}, activations {}, images {}, features {}",
        gib(est.model_bytes),
        gib(est.queue_bytes),
        gib(est.activation_bytes),
        gib(est.data_bytes),
        gib(est.feature_bytes)
    );
    let advice = "lower --batch-size, --image-size, --moco-k or --dim, pick a smaller --arch, or set --train-limit/--test-limit";
    let host_need = match device_free {
        Some(_) => est.host_only_bytes(),
        None => est.total_bytes(),
    };
    if let Some(free) = host_free {
        if host_need > free {
            return Err(Error::invalid(format!(
                "this config needs at least {} of host memory ({parts}) but {} is available; {advice}",
                gib(host_need),
                gib(free)
            )));
        }
    }
    if let Some(free) = device_free {
        if est.backend_bytes() > free {
            return Err(Error::invalid(format!(
                "this config needs at least {} of GPU memory ({parts}) but {} is free; {advice}",
                gib(est.backend_bytes()),
                gib(free)
            )));
        }
    }
    Ok(())
}
