//! The network description and its construction: the input shape, the layer records
//! (convolution, BatchNorm, linear, residual block, head) with their offsets in the flat
//! buffers, and the builder that lays out the [`ParamTable`] and draws the initial values.
use rand::Rng;
use rand_distr::{Distribution, Normal};

use super::{Arch, EncoderConfig, ParamTable, Storage};
use crate::backend::{BnOffsets, LinearShape};
use crate::error::Result;

/// Shape of an input batch (NCHW).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputShape {
    /// Batch size.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
}

impl InputShape {
    /// `N x C x H x W`.
    pub fn new(n: usize, c: usize, h: usize, w: usize) -> Self {
        InputShape { n, c, h, w }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    /// True when the batch has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Conv {
    pub(super) cin: usize,
    pub(super) cout: usize,
    pub(super) k: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
    pub(super) w: usize,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Bn {
    pub(super) c: usize,
    pub(super) off: BnOffsets,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Linear {
    pub(super) fin: usize,
    pub(super) fout: usize,
    pub(super) w: usize,
    pub(super) b: usize,
}

/// A residual block: `stages` of conv -> BN (-> ReLU except after the last), plus the
/// shortcut (identity or 1x1 conv + BN), sum, ReLU. BasicBlock has 2 stages, Bottleneck 3.
#[derive(Debug, Clone)]
pub(super) struct Block {
    pub(super) stages: Vec<(Conv, Bn)>,
    pub(super) down: Option<(Conv, Bn)>,
}

#[derive(Debug, Clone)]
pub(super) enum Head {
    Linear(Linear),
    Mlp(Linear, Linear),
}

#[derive(Debug, Clone)]
pub(super) struct Net {
    pub(super) conv1: Conv,
    pub(super) bn1: Bn,
    pub(super) maxpool: bool,
    pub(super) blocks: Vec<Block>,
    pub(super) feat: usize,
    pub(super) head: Head,
}

struct Builder {
    table: ParamTable,
    /// Host initial values of the parameters, in table order.
    init: Vec<f32>,
    running_init: Vec<f32>,
    rng: rand_chacha::ChaCha8Rng,
}

impl Builder {
    fn conv(&mut self, name: &str, cin: usize, cout: usize, k: usize, stride: usize) -> Conv {
        let w = self.table.push(
            format!("{name}.weight"),
            vec![cout, cin, k, k],
            Storage::Param,
        );
        // torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu").
        let std = (2.0 / (cout * k * k) as f64).sqrt() as f32;
        let dist = Normal::new(0.0f32, std).expect("finite std");
        for _ in 0..cout * cin * k * k {
            self.init.push(dist.sample(&mut self.rng));
        }
        Conv {
            cin,
            cout,
            k,
            stride,
            pad: k / 2,
            w,
        }
    }
    fn bn(&mut self, name: &str, c: usize) -> Bn {
        let gamma = self
            .table
            .push(format!("{name}.weight"), vec![c], Storage::Param);
        self.init.extend(std::iter::repeat_n(1.0, c));
        let beta = self
            .table
            .push(format!("{name}.bias"), vec![c], Storage::Param);
        self.init.extend(std::iter::repeat_n(0.0, c));
        let mean = self.table.push(
            format!("{name}.running_mean"),
            vec![c],
            Storage::RunningMean,
        );
        self.running_init.extend(std::iter::repeat_n(0.0, c));
        let var = self
            .table
            .push(format!("{name}.running_var"), vec![c], Storage::RunningVar);
        self.running_init.extend(std::iter::repeat_n(1.0, c));
        self.table.push(
            format!("{name}.num_batches_tracked"),
            vec![],
            Storage::NumBatchesTracked,
        );
        Bn {
            c,
            off: BnOffsets {
                gamma,
                beta,
                mean,
                var,
            },
        }
    }
    fn linear(&mut self, name: &str, fin: usize, fout: usize) -> Linear {
        // PyTorch default: kaiming_uniform_(a=sqrt(5)) => U(-1/sqrt(in), 1/sqrt(in)), same
        // bound for the bias.
        let bound = 1.0 / (fin as f32).sqrt();
        let w = self
            .table
            .push(format!("{name}.weight"), vec![fout, fin], Storage::Param);
        for _ in 0..fout * fin {
            let v = self.rng.random_range(-bound..bound);
            self.init.push(v);
        }
        let b = self
            .table
            .push(format!("{name}.bias"), vec![fout], Storage::Param);
        for _ in 0..fout {
            let v = self.rng.random_range(-bound..bound);
            self.init.push(v);
        }
        Linear { fin, fout, w, b }
    }
}

pub(super) fn build(cfg: &EncoderConfig, seed: u64) -> (Net, ParamTable, Vec<f32>, Vec<f32>) {
    let mut b = Builder {
        table: ParamTable::default(),
        init: Vec::new(),
        running_init: Vec::new(),
        rng: crate::rng::rng(seed),
    };
    let cin = cfg.in_channels;
    let (conv1, maxpool, widths, depths, bottleneck) = match cfg.arch {
        Arch::Resnet8 | Arch::Resnet20 => {
            let n = if cfg.arch == Arch::Resnet8 { 1 } else { 3 };
            (
                b.conv("conv1", cin, 16, 3, 1),
                false,
                vec![16, 32, 64],
                vec![n; 3],
                false,
            )
        }
        Arch::Resnet18Cifar => (
            b.conv("conv1", cin, 64, 3, 1),
            false,
            vec![64, 128, 256, 512],
            vec![2; 4],
            false,
        ),
        Arch::Resnet18 => (
            b.conv("conv1", cin, 64, 7, 2),
            true,
            vec![64, 128, 256, 512],
            vec![2; 4],
            false,
        ),
        Arch::Resnet50 => (
            b.conv("conv1", cin, 64, 7, 2),
            true,
            vec![64, 128, 256, 512],
            vec![3, 4, 6, 3],
            true,
        ),
    };
    let bn1 = b.bn("bn1", conv1.cout);
    let mut blocks = Vec::new();
    let mut c = conv1.cout;
    for (li, (&width, &depth)) in widths.iter().zip(&depths).enumerate() {
        for bi in 0..depth {
            let stride = if li > 0 && bi == 0 { 2 } else { 1 };
            let p = format!("layer{}.{}", li + 1, bi);
            let (stages, cout) = if bottleneck {
                let out = width * 4;
                let c1 = b.conv(&format!("{p}.conv1"), c, width, 1, 1);
                let n1 = b.bn(&format!("{p}.bn1"), width);
                let c2 = b.conv(&format!("{p}.conv2"), width, width, 3, stride);
                let n2 = b.bn(&format!("{p}.bn2"), width);
                let c3 = b.conv(&format!("{p}.conv3"), width, out, 1, 1);
                let n3 = b.bn(&format!("{p}.bn3"), out);
                (vec![(c1, n1), (c2, n2), (c3, n3)], out)
            } else {
                let c1 = b.conv(&format!("{p}.conv1"), c, width, 3, stride);
                let n1 = b.bn(&format!("{p}.bn1"), width);
                let c2 = b.conv(&format!("{p}.conv2"), width, width, 3, 1);
                let n2 = b.bn(&format!("{p}.bn2"), width);
                (vec![(c1, n1), (c2, n2)], width)
            };
            let down = if stride != 1 || c != cout {
                let dc = b.conv(&format!("{p}.downsample.0"), c, cout, 1, stride);
                let dn = b.bn(&format!("{p}.downsample.1"), cout);
                Some((dc, dn))
            } else {
                None
            };
            blocks.push(Block { stages, down });
            c = cout;
        }
    }
    b.table.backbone_params = b.table.params;
    let head = if cfg.mlp {
        let l1 = b.linear("fc.0", c, c);
        let l2 = b.linear("fc.2", c, cfg.dim);
        Head::Mlp(l1, l2)
    } else {
        Head::Linear(b.linear("fc", c, cfg.dim))
    };
    let net = Net {
        conv1,
        bn1,
        maxpool,
        blocks,
        feat: c,
        head,
    };
    (net, b.table, b.init, b.running_init)
}

/// The name/shape/offset table of `cfg` without allocating the parameters.
pub(super) fn table_for(cfg: &EncoderConfig) -> Result<ParamTable> {
    cfg.validate()?;
    Ok(build(cfg, 0).1)
}

impl ParamTable {
    /// The table of the encoder `cfg` describes (no parameter buffer is allocated).
    pub fn for_config(cfg: &EncoderConfig) -> Result<ParamTable> {
        table_for(cfg)
    }
}

pub(super) fn lin_shape(n: usize, l: &Linear) -> LinearShape {
    LinearShape {
        n,
        fin: l.fin,
        fout: l.fout,
    }
}
