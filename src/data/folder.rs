//! Image folders in the ImageNet / torchvision `ImageFolder` layout.
//!
//! ```text
//! root/train/<class>/*.{jpg,jpeg,png}     root/val/<class>/*.{jpg,jpeg,png}
//! ```
//!
//! Classes are the subfolders of `root/train` sorted by name (label = position; hidden
//! folders, whose names start with a dot, are skipped), for both
//! splits, so a class missing from `val/` keeps its label. The test split is `root/val` or,
//! failing that, `root/test`. A `root` without a `train/` subfolder is itself the class root
//! and serves both splits.
//!
//! Every image is decoded (in parallel), converted to RGB, resized so its shorter side is
//! `image_size` (triangle filter, antialiased) and center-cropped to `image_size` x
//! `image_size`; that square is what the data set stores and what the augmentations crop
//! from. Memory is `N * 3 * image_size^2` bytes: fine for small folders, not for all of
//! ImageNet at 224. Normalization uses ImageNet's statistics ([`IMAGENET_MEAN`], [`IMAGENET_STD`]).
//!
//! ```no_run
//! let ds = moco::data::folder::load("data/imagenette", true, 64).unwrap();
//! println!("{} images of {} classes", ds.len(), ds.num_classes);
//! ```
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::{data_err, Dataset};
use crate::{Error, Result};

/// ImageNet channel means (RGB, [0, 1] scale).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        .unwrap_or(false)
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        out.push(e.map_err(|e| Error::io(dir, e))?.path());
    }
    out.sort();
    Ok(out)
}

/// Decodes one image file and returns it as `size x size` RGB, CHW.
pub fn load_image(path: &Path, size: usize) -> Result<Vec<u8>> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let img = reader
        .decode()
        .map_err(|e| data_err(path, format!("cannot decode image: {e}")))?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(data_err(path, "image has no pixels"));
    }
    // Shorter side to `size`, then center crop.
    let (nw, nh) = if w <= h {
        (
            size,
            ((h * size) as f64 / w as f64).round().max(size as f64) as usize,
        )
    } else {
        (
            ((w * size) as f64 / h as f64).round().max(size as f64) as usize,
            size,
        )
    };
    let resized = if (nw, nh) == (w, h) {
        img
    } else {
        image::imageops::resize(
            &img,
            nw as u32,
            nh as u32,
            image::imageops::FilterType::Triangle,
        )
    };
    let (x0, y0) = ((nw - size) / 2, (nh - size) / 2);
    let plane = size * size;
    let mut out = vec![0u8; 3 * plane];
    for y in 0..size {
        for x in 0..size {
            let p = resized.get_pixel((x0 + x) as u32, (y0 + y) as u32);
            for c in 0..3 {
                out[c * plane + y * size + x] = p[c];
            }
        }
    }
    Ok(out)
}

/// Loads the training or test split of an image folder at `image_size` x `image_size`.
pub fn load(root: impl AsRef<Path>, train: bool, image_size: usize) -> Result<Dataset> {
    let root = root.as_ref();
    if !(1..=4096).contains(&image_size) {
        return Err(Error::invalid(format!(
            "image size must be in 1..=4096, not {image_size}"
        )));
    }
    if !root.is_dir() {
        return Err(Error::io(
            root,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
        ));
    }
    let train_dir = root.join("train");
    let has_split = train_dir.is_dir();
    let class_root = if has_split {
        train_dir.clone()
    } else {
        root.to_path_buf()
    };
    let split_root = if !has_split || train {
        class_root.clone()
    } else if root.join("val").is_dir() {
        root.join("val")
    } else if root.join("test").is_dir() {
        root.join("test")
    } else {
        return Err(data_err(
            root,
            "has a train/ folder but no val/ or test/ folder for the test split",
        ));
    };
    let classes: Vec<String> = read_dir_sorted(&class_root)?
        .into_iter()
        .filter(|p| p.is_dir())
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !n.starts_with('.'))
        .collect();
    if classes.is_empty() {
        return Err(data_err(
            &class_root,
            "no class subfolders (expected one folder of images per class)",
        ));
    }
    let mut files: Vec<(PathBuf, u32)> = Vec::new();
    for (label, c) in classes.iter().enumerate() {
        let dir = split_root.join(c);
        if !dir.is_dir() {
            continue;
        }
        for p in read_dir_sorted(&dir)? {
            if p.is_file() && is_image(&p) {
                files.push((p, label as u32));
            }
        }
    }
    if files.is_empty() {
        return Err(data_err(
            &split_root,
            "no .jpg, .jpeg or .png images in the class subfolders",
        ));
    }
    let decoded: Vec<Vec<u8>> = files
        .par_iter()
        .map(|(p, _)| load_image(p, image_size))
        .collect::<Result<_>>()?;
    let labels: Vec<u32> = files.iter().map(|(_, l)| *l).collect();
    let images = decoded.concat();
    let base = root
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "folder".into());
    let split = if train { "train" } else { "test" };
    let mut ds = Dataset::new(
        format!("{base} {split}"),
        3,
        image_size,
        image_size,
        images,
        labels,
        classes.len(),
    )?;
    ds.mean = IMAGENET_MEAN.to_vec();
    ds.std = IMAGENET_STD.to_vec();
    ds.class_names = classes;
    Ok(ds)
}
