//! Where the loader's images come from: held in memory, or read and decoded per sample.
//!
//! A [`Source`] is what a [`Loader`](super::Loader) draws from. The small data sets
//! (synthetic, IDX, CIFAR) are [`Source::Memory`]: every image is a slice of one
//! [`Dataset`] buffer, borrowed at no cost. Image folders are [`Source::Folder`]: an index
//! of files and labels ([`FolderIndex`]) whose images are read and decoded by the loader's
//! workers each time a sample is drawn, so memory is bounded by the batches in flight, not
//! by the data set (ImageNet-1k decoded at 224 px would be about 193 GB).
//!
//! Either way an image arrives as an [`Image`]: `u8` pixels with their shape and layout
//! (planar CHW for the in-memory sets, interleaved HWC as decoders give it), at whatever
//! size it has; the augmentations crop from it directly.
//!
//! ```
//! use moco::data::{source::Source, synthetic::SyntheticConfig};
//! let ds = SyntheticConfig { train_len: 8, ..Default::default() }.generate(true).unwrap();
//! let src = Source::from(ds);
//! assert_eq!((src.len(), src.channels(), src.streamed()), (8, 3, false));
//! let img = src.load(3).unwrap();
//! assert_eq!((img.channels, img.height, img.width), (3, 32, 32));
//! ```
use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use super::folder::{BadImages, FolderIndex, SkipLog};
use super::Dataset;
use crate::{Error, Result};

/// Memory order of an [`Image`]'s pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Planar: all of channel 0, then channel 1, ... (`c x h x w`).
    Chw,
    /// Interleaved: pixel by pixel, the channels of each pixel together (`h x w x c`).
    Hwc,
}

/// One decoded image: `channels x height x width` `u8` pixels (0 = black) in `layout`.
#[derive(Clone, Debug, PartialEq)]
pub struct Image<'a> {
    /// Channels: 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// Memory order of `pixels`.
    pub layout: Layout,
    /// `channels * height * width` bytes.
    pub pixels: Cow<'a, [u8]>,
}

impl<'a> Image<'a> {
    /// A planar (CHW) image; checks that the sizes agree.
    pub fn chw(c: usize, h: usize, w: usize, pixels: impl Into<Cow<'a, [u8]>>) -> Result<Self> {
        Self::new(c, h, w, Layout::Chw, pixels.into())
    }

    /// An interleaved (HWC) image; checks that the sizes agree.
    pub fn hwc(c: usize, h: usize, w: usize, pixels: impl Into<Cow<'a, [u8]>>) -> Result<Self> {
        Self::new(c, h, w, Layout::Hwc, pixels.into())
    }

    fn new(c: usize, h: usize, w: usize, layout: Layout, pixels: Cow<'a, [u8]>) -> Result<Self> {
        let n = c.checked_mul(h).and_then(|v| v.checked_mul(w));
        if c == 0 || h == 0 || w == 0 || n != Some(pixels.len()) {
            return Err(Error::invalid(format!(
                "image of {} bytes is not {c}x{h}x{w} (channels x height x width)",
                pixels.len()
            )));
        }
        Ok(Image {
            channels: c,
            height: h,
            width: w,
            layout,
            pixels,
        })
    }

    /// Element strides `(channel, row, column)` of the layout.
    pub fn strides(&self) -> (usize, usize, usize) {
        match self.layout {
            Layout::Chw => (self.height * self.width, self.width, 1),
            Layout::Hwc => (1, self.width * self.channels, self.channels),
        }
    }

    /// The same image in planar (CHW) order (borrowed when it already is).
    pub fn to_chw(&self) -> Cow<'_, [u8]> {
        match self.layout {
            Layout::Chw => Cow::Borrowed(&self.pixels),
            Layout::Hwc => {
                let (c, plane) = (self.channels, self.height * self.width);
                let mut out = vec![0u8; c * plane];
                for (i, px) in self.pixels.chunks_exact(c).enumerate() {
                    for (ch, &v) in px.iter().enumerate() {
                        out[ch * plane + i] = v;
                    }
                }
                Cow::Owned(out)
            }
        }
    }
}

/// The images a [`Loader`](super::Loader) draws from (cheap to clone: shared).
#[derive(Clone, Debug)]
pub enum Source {
    /// Every image decoded and held in memory (synthetic, IDX, CIFAR; or a small folder
    /// loaded with [`folder::load`](super::folder::load)).
    Memory(Arc<Dataset>),
    /// An image folder, read and decoded per sample ([`FolderIndex`]).
    Folder(Arc<FolderIndex>),
}

impl From<Dataset> for Source {
    fn from(d: Dataset) -> Self {
        Source::Memory(Arc::new(d))
    }
}

impl From<Arc<Dataset>> for Source {
    fn from(d: Arc<Dataset>) -> Self {
        Source::Memory(d)
    }
}

impl From<FolderIndex> for Source {
    fn from(f: FolderIndex) -> Self {
        Source::Folder(Arc::new(f))
    }
}

impl Source {
    /// Short name ("synthetic", "imagenet train", ...).
    pub fn name(&self) -> &str {
        match self {
            Source::Memory(d) => &d.name,
            Source::Folder(f) => f.name(),
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels().len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One label per image.
    pub fn labels(&self) -> &[u32] {
        match self {
            Source::Memory(d) => &d.labels,
            Source::Folder(f) => f.labels(),
        }
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        match self {
            Source::Memory(d) => d.num_classes,
            Source::Folder(f) => f.num_classes(),
        }
    }

    /// Class names when the source has them (folder names), else empty.
    pub fn class_names(&self) -> &[String] {
        match self {
            Source::Memory(d) => &d.class_names,
            Source::Folder(f) => f.class_names(),
        }
    }

    /// Channels of every image the source yields.
    pub fn channels(&self) -> usize {
        match self {
            Source::Memory(d) => d.channels,
            Source::Folder(_) => 3,
        }
    }

    /// Per-channel normalization mean (see [`Dataset::mean`]).
    pub fn mean(&self) -> &[f32] {
        match self {
            Source::Memory(d) => &d.mean,
            Source::Folder(_) => &super::folder::IMAGENET_MEAN,
        }
    }

    /// Per-channel normalization standard deviation.
    pub fn std(&self) -> &[f32] {
        match self {
            Source::Memory(d) => &d.std,
            Source::Folder(_) => &super::folder::IMAGENET_STD,
        }
    }

    /// True when images are read and decoded per sample (photos of any size) rather than
    /// held in memory at one size.
    pub fn streamed(&self) -> bool {
        matches!(self, Source::Folder(_))
    }

    /// The fixed `(height, width)` of every image of an in-memory source; `None` when
    /// streamed (each photo has its own size).
    pub fn fixed_size(&self) -> Option<(usize, usize)> {
        match self {
            Source::Memory(d) => Some((d.height, d.width)),
            Source::Folder(_) => None,
        }
    }

    /// Bytes held in memory for the images themselves (0 when streamed).
    pub fn resident_bytes(&self) -> u64 {
        match self {
            Source::Memory(d) => d.images.len() as u64,
            Source::Folder(_) => 0,
        }
    }

    /// What the source does with an image it cannot read or decode.
    pub fn bad_images(&self) -> BadImages {
        match self {
            Source::Memory(_) => BadImages::Error,
            Source::Folder(f) => f.bad_images(),
        }
    }

    /// Image `i`: borrowed from memory, or read and decoded now. An error names the file
    /// (`Error::Data` for a file that cannot be decoded, `Error::Io` for one that cannot be
    /// read) or says that `i` is out of range.
    pub fn load(&self, i: usize) -> Result<Image<'_>> {
        if i >= self.len() {
            return Err(Error::invalid(format!(
                "{}: image {i} is out of range for {} images",
                self.name(),
                self.len()
            )));
        }
        match self {
            Source::Memory(d) => Image::chw(d.channels, d.height, d.width, d.image(i)),
            Source::Folder(f) => f.load(i),
        }
    }

    /// The path of image `i` when it comes from a file.
    pub fn path(&self, i: usize) -> Option<&Path> {
        match self {
            Source::Memory(_) => None,
            Source::Folder(f) => f.path(i),
        }
    }

    /// Checks the invariants the loader relies on ([`Dataset::validate`] for in-memory
    /// sets; a folder index is valid by construction).
    pub fn validate(&self) -> Result<()> {
        match self {
            Source::Memory(d) => d.validate(),
            Source::Folder(f) => {
                if f.labels().is_empty() {
                    return Err(Error::invalid(format!("{}: no images", f.name())));
                }
                Ok(())
            }
        }
    }

    /// The same source with only its first `n` images (all when `n` is 0 or at least
    /// the length).
    pub fn truncate(self, n: usize) -> Source {
        if n == 0 || n >= self.len() {
            return self;
        }
        match self {
            Source::Memory(d) => Source::Memory(Arc::new(Arc::unwrap_or_clone(d).truncate(n))),
            Source::Folder(f) => Source::Folder(Arc::new(f.truncated(n))),
        }
    }

    /// Records that an image could not be used and was replaced (the loader calls this
    /// under [`BadImages::Skip`]); in-memory images never fail, so only a folder keeps a log.
    pub fn note_skip(&self, error: &Error) {
        if let Source::Folder(f) = self {
            f.note_skip(error);
        }
    }

    /// The images replaced so far ([`FolderIndex::skip_log`]); `None` for in-memory data.
    pub fn skip_log(&self) -> Option<SkipLog> {
        match self {
            Source::Memory(_) => None,
            Source::Folder(f) => Some(f.skip_log()),
        }
    }

    /// The in-memory data set, when this is one.
    pub fn dataset(&self) -> Option<&Arc<Dataset>> {
        match self {
            Source::Memory(d) => Some(d),
            Source::Folder(_) => None,
        }
    }
}
