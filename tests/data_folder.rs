//! Image-folder reader on a generated folder of PNG and JPEG files.
use std::path::Path;

use moco::data::folder;
use moco::Error;

fn png(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    img.save(path).unwrap();
}

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

/// root/train/{cat,dog}/..., root/val/{cat,dog}/...
fn make_tree(root: &Path) {
    for split in ["train", "val"] {
        for class in ["dog", "cat"] {
            std::fs::create_dir_all(root.join(split).join(class)).unwrap();
        }
    }
    // cat: solid red 20x20 (two of them), dog: left half black / right half white, 40x20.
    png(&root.join("train/cat/a.png"), 20, 20, |_, _| [255, 0, 0]);
    png(&root.join("train/cat/b.PNG"), 20, 20, |_, _| [250, 0, 0]);
    png(&root.join("train/dog/a.png"), 40, 20, |x, _| {
        if x < 20 {
            [0; 3]
        } else {
            [255; 3]
        }
    });
    std::fs::write(root.join("train/dog/notes.txt"), "not an image").unwrap();
    // Hidden folders are not classes.
    std::fs::create_dir_all(root.join("train/.cache")).unwrap();
    let jpg = image::RgbImage::from_fn(16, 16, |_, _| image::Rgb([0, 0, 255]));
    jpg.save(root.join("val/dog/x.jpg")).unwrap();
}

#[test]
fn loads_classes_sorted_resized_and_center_cropped() {
    let dir = tempfile::tempdir().unwrap();
    make_tree(dir.path());
    let train = folder::load(dir.path(), true, 8).unwrap();
    assert_eq!(train.class_names, vec!["cat", "dog"]);
    assert_eq!(train.labels, vec![0, 0, 1]);
    assert_eq!((train.channels, train.height, train.width), (3, 8, 8));
    assert_eq!(train.mean, folder::IMAGENET_MEAN.to_vec());
    // Red image: R plane 255, G and B 0.
    let cat = train.image(0);
    assert!(cat[..64].iter().all(|&v| v == 255) && cat[64..].iter().all(|&v| v == 0));
    // 40x20 -> 16x8 -> center 8x8: the middle, left half black, right half white.
    let dog = train.image(2);
    assert!(dog[0] < 30 && dog[7] > 225, "row 0: {:?}", &dog[..8]);
    // Test split: val/, with the classes of train/ (dog keeps label 1).
    let val = moco::data::open_dataset("folder", Some(dir.path()), false, 8, 0).unwrap();
    assert_eq!(val.labels, vec![1]);
    assert_eq!(val.num_classes, 2);
    let blue = val.image(0);
    assert!(blue[128..].iter().all(|&v| v > 240) && blue[..64].iter().all(|&v| v < 15));
}

#[test]
fn flat_folder_serves_both_splits() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    png(&dir.path().join("a/1.png"), 5, 7, |x, y| {
        [x as u8 * 40, y as u8 * 30, 9]
    });
    let tr = folder::load(dir.path(), true, 4).unwrap();
    let te = folder::load(dir.path(), false, 4).unwrap();
    assert_eq!(tr.images, te.images);
    assert_eq!(tr.len(), 1);
}

#[test]
fn bad_folders_are_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // No class subfolders.
    assert_data_err(folder::load(d, true, 8), d, "no class subfolders");
    // Class folders without images.
    std::fs::create_dir_all(d.join("x")).unwrap();
    std::fs::write(d.join("x/readme.txt"), "hi").unwrap();
    assert_data_err(folder::load(d, true, 8), d, "no .jpg");
    // An unreadable image.
    let bad = d.join("x/broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nthis is not really a png").unwrap();
    assert_data_err(folder::load(d, true, 8), &bad, "decode");
    let bad2 = d.join("x/broken.png");
    std::fs::write(&bad2, b"").unwrap();
    assert!(folder::load(d, true, 8).is_err());
    // train/ without val/ or test/.
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("train/a")).unwrap();
    png(&t.path().join("train/a/1.png"), 4, 4, |_, _| [1, 2, 3]);
    assert!(folder::load(t.path(), true, 4).is_ok());
    assert_data_err(folder::load(t.path(), false, 4), t.path(), "val/");
    // Bad sizes and missing roots.
    assert!(matches!(
        folder::load(t.path(), true, 0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        folder::load(d.join("missing"), true, 8),
        Err(Error::Io { .. })
    ));
}

/// A 96x96 JPEG with detail everywhere (so its scan data is long), quality 90.
fn detailed_jpeg() -> Vec<u8> {
    let img = image::RgbImage::from_fn(96, 96, |x, y| {
        let v = (x * 7 + y * 13) ^ (x * y);
        image::Rgb([v as u8, (v >> 3) as u8 ^ (x as u8), (y * 5) as u8])
    });
    let mut out = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
    img.write_with_encoder(enc).unwrap();
    out
}

/// Flips `n` bytes (XOR with a nonzero value) at pseudo-random positions after `from`.
fn flip_bytes(bytes: &mut [u8], from: usize, n: usize, mut seed: u64) {
    for _ in 0..n {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = from + (seed >> 33) as usize % (bytes.len() - from);
        bytes[at] ^= ((seed >> 20) as u8) | 1;
    }
}

/// Start of the entropy-coded data: just past the start-of-scan header.
fn scan_start(jpeg: &[u8]) -> usize {
    let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    sos + 2 + u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]) as usize
}

/// Issue 13 item 5: JPEGs cut to a third, or with 400 flipped bytes, were decoded without
/// an error (the decoder pads and conceals). They are errors naming the file.
#[test]
fn corrupt_jpegs_are_errors_naming_the_file() {
    let good = detailed_jpeg();
    assert!(good.len() > 3000, "{}", good.len());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("a")).unwrap();
    let f = d.join("a/x.jpg");
    std::fs::write(&f, &good).unwrap();
    let ok = folder::load(d, true, 32).unwrap();
    assert_eq!(ok.len(), 1);
    // Cut to a third.
    std::fs::write(&f, &good[..good.len() / 3]).unwrap();
    assert_data_err(folder::load(d, true, 32), &f, "truncated");
    // Cut just before the end-of-image marker, and with a byte of it missing.
    std::fs::write(&f, &good[..good.len() - 2]).unwrap();
    assert_data_err(folder::load(d, true, 32), &f, "truncated");
    std::fs::write(&f, &good[..good.len() - 1]).unwrap();
    assert_data_err(folder::load(d, true, 32), &f, "truncated");
    // 400 flipped bytes anywhere in the scan, for several placements.
    for seed in 0..20 {
        let mut bad = good.clone();
        flip_bytes(&mut bad, scan_start(&good), 400, seed);
        std::fs::write(&f, &bad).unwrap();
        assert_data_err(folder::load(d, true, 32), &f, "JPEG");
    }
    // Bytes after the end-of-image marker are allowed (cameras append data there).
    let mut tail = good.clone();
    tail.extend_from_slice(b"trailing camera data");
    std::fs::write(&f, &tail).unwrap();
    assert_eq!(folder::load(d, true, 32).unwrap().images, ok.images);
}

/// `BadImages::Skip` leaves undecodable images out and reports each; the default stops.
#[test]
fn bad_images_skip_reports_each_and_loads_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_tree(d);
    let good = detailed_jpeg();
    let cut = d.join("train/cat/cut.jpg");
    std::fs::write(&cut, &good[..good.len() / 3]).unwrap();
    let junk = d.join("train/dog/junk.png");
    std::fs::write(&junk, b"\x89PNG\r\n\x1a\nnot a png").unwrap();
    assert_data_err(folder::load(d, true, 8), &cut, "truncated");
    let (ds, skipped) = folder::load_report(d, true, 8, folder::BadImages::Skip).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.labels, vec![0, 0, 1]);
    let paths: Vec<_> = skipped.iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, vec![cut.clone(), junk.clone()]);
    assert!(skipped[0].error.to_string().contains("cut.jpg"));
    // Nothing left: an error even when skipping.
    let only = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(only.path().join("a")).unwrap();
    std::fs::write(only.path().join("a/cut.jpg"), &good[..100]).unwrap();
    let r = folder::load_report(only.path(), true, 8, folder::BadImages::Skip);
    assert_data_err(r.map(|x| x.0), only.path(), "none of the 1 images");
    // The names.
    assert_eq!(
        "skip".parse::<folder::BadImages>().unwrap(),
        folder::BadImages::Skip
    );
    assert_eq!(
        "ERROR".parse::<folder::BadImages>().unwrap(),
        folder::BadImages::Error
    );
    assert!("ignore".parse::<folder::BadImages>().is_err());
}

/// The config field and its check: `error` by default, `skip` accepted, others refused,
/// and a config.json without the field (written before it existed) still loads.
#[test]
fn bad_images_config_field() {
    use moco::data::folder::BadImages;
    let c = moco::train::TrainConfig::default();
    assert_eq!(c.bad_images, BadImages::Error);
    let skip = moco::train::TrainConfig {
        bad_images: BadImages::Skip,
        ..c.clone()
    };
    skip.validate().unwrap();
    let e = "sometimes".parse::<BadImages>().unwrap_err().to_string();
    assert!(e.contains("--bad-images"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    // A config file with a value no variant has names the key's flag.
    std::fs::write(&p, "bad_images = \"sometimes\"\n").unwrap();
    let e = moco::train::TrainConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("--bad-images") && e.contains("sometimes"), "{e}");
    std::fs::write(&p, "bad_images = \"skip\"\nepochs = 2\n").unwrap();
    assert_eq!(
        moco::train::TrainConfig::load(&p).unwrap().bad_images,
        BadImages::Skip
    );
    std::fs::write(&p, "epochs = 2\n").unwrap();
    assert_eq!(
        moco::train::TrainConfig::load(&p).unwrap().bad_images,
        BadImages::Error
    );
}

/// `moco train --bad-images`: refused values, and `skip` end to end (each skipped file
/// and the count on stderr, training goes on with the rest; `error` stops naming it).
#[test]
fn bad_images_flag_end_to_end() {
    let bin = std::env::var("MOCO_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_moco").into());
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&bin)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for c in ["a", "b"] {
        std::fs::create_dir_all(d.join(c)).unwrap();
        for i in 0..4 {
            png(&d.join(format!("{c}/{i}.png")), 12, 10, |x, y| {
                [
                    x as u8 * 20,
                    y as u8 * (i + 1),
                    if c == "a" { 0 } else { 255 },
                ]
            });
        }
    }
    let good = detailed_jpeg();
    let cut = d.join("b/cut.jpg");
    std::fs::write(&cut, &good[..good.len() / 3]).unwrap();
    let data = d.to_str().unwrap();
    let out = d.join("run");
    let mut args = vec![
        "train",
        "--dataset",
        "folder",
        "--data",
        data,
        "--image-size",
        "8",
        "--device",
        "cpu",
        "--arch",
        "resnet8",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--moco-k",
        "8",
        "--dim",
        "4",
        "--bn-splits",
        "1",
        "--quiet",
        "--out",
    ];
    args.push(out.to_str().unwrap());
    let (ok, err) = run(&args);
    assert!(
        !ok && err.contains("cut.jpg") && err.contains("truncated"),
        "{err}"
    );
    args.extend(["--bad-images", "skip"]);
    let (ok, err) = run(&args);
    assert!(ok, "{err}");
    // Streamed: the file is found bad when drawn (training or the kNN pass), replaced by
    // the next image, named and counted.
    assert!(err.contains("cut.jpg"), "{err}");
    assert!(err.contains("were replaced by the next image"), "{err}");
    let saved = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(saved.contains("\"bad_images\": \"skip\""), "{saved}");
    args.pop();
    args.push("sometimes");
    let (ok, err) = run(&args);
    assert!(!ok && err.contains("--bad-images"), "{err}");
}
