//! Streamed image folders: an index of files, photos decoded per sample at their own size,
//! both views cut from one decode, crops from the whole photo, bad files mid-run.
use std::path::{Path, PathBuf};

use moco::data::augment::{self, Augment, Crop};
use moco::data::folder::{BadImages, FolderIndex};
use moco::data::{Layout, Loader, Source};
use moco::testing::rng;
use moco::Error;

/// A deterministic, detailed RGB photo of `w x h` (PNG or JPEG by the extension).
fn photo(path: &Path, w: u32, h: u32, seed: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = x.wrapping_mul(37) ^ y.wrapping_mul(101) ^ seed.wrapping_mul(2654435761);
        image::Rgb([
            (v % 251) as u8,
            (x * 255 / w.max(1)) as u8,
            (y * 255 / h.max(1)) as u8,
        ])
    });
    img.save(path).unwrap();
}

/// root/train/{a,b}/*.png of several non-square sizes, root/val/{a,b}/*.png.
fn make_photos(root: &Path, per_class: u32) -> Vec<(u32, u32)> {
    let sizes = [(30, 20), (17, 41), (64, 48), (50, 37), (23, 23)];
    let mut used = Vec::new();
    for split in ["train", "val"] {
        for (ci, c) in ["a", "b"].iter().enumerate() {
            let d = root.join(split).join(c);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..per_class {
                let (w, h) = sizes[(i as usize + ci) % sizes.len()];
                photo(&d.join(format!("{i:03}.png")), w, h, i * 7 + ci as u32);
                if split == "train" {
                    used.push((w, h));
                }
            }
        }
    }
    used
}

fn index(root: &Path, bad: BadImages) -> FolderIndex {
    let (ix, skipped) = FolderIndex::open(root, true, bad).unwrap();
    assert!(skipped.is_empty(), "{skipped:?}");
    ix
}

#[test]
fn index_lists_files_and_loads_photos_at_their_own_size() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = make_photos(dir.path(), 3);
    let ix = index(dir.path(), BadImages::Error);
    assert_eq!(ix.len(), 6);
    assert_eq!(ix.labels(), &[0, 0, 0, 1, 1, 1]);
    assert_eq!(ix.class_names(), &["a".to_string(), "b".to_string()]);
    let src = Source::from(ix);
    assert!(src.streamed());
    assert_eq!(src.resident_bytes(), 0);
    assert_eq!(src.fixed_size(), None);
    for (i, &(w, h)) in sizes.iter().enumerate() {
        let img = src.load(i).unwrap();
        assert_eq!(
            (img.channels, img.height, img.width),
            (3, h as usize, w as usize)
        );
        assert_eq!(img.layout, Layout::Hwc);
        let want = image::open(src.path(i).unwrap()).unwrap().to_rgb8();
        assert_eq!(&img.pixels[..], want.as_raw().as_slice());
    }
    assert!(src.load(6).is_err());
    // The test split shares the training split's classes.
    let (val, _) = FolderIndex::open(dir.path(), false, BadImages::Error).unwrap();
    assert_eq!((val.len(), val.num_classes()), (6, 2));
}

/// The strided (HWC) crop gives exactly what the planar reference gives, for every preset,
/// and random crops reach the photo's borders, outside the centre square.
#[test]
fn views_of_a_photo_equal_the_planar_path_and_reach_its_borders() {
    let dir = tempfile::tempdir().unwrap();
    make_photos(dir.path(), 5);
    let src = Source::from(index(dir.path(), BadImages::Error));
    let (m, s) = (src.mean().to_vec(), src.std().to_vec());
    for aug in [
        Augment::v1(16, &m, &s).unwrap(),
        Augment::v2(16, &m, &s).unwrap(),
        Augment::eval_photo(16, &m, &s).unwrap(),
    ] {
        for i in 0..src.len() {
            let img = src.load(i).unwrap();
            let chw = img.to_chw();
            let (mut a, mut b) = (vec![0.0f32; 3 * 256], vec![0.0f32; 3 * 256]);
            aug.apply_image(&img, &mut rng(i as u64), &mut a).unwrap();
            aug.apply(&chw, 3, img.height, img.width, &mut rng(i as u64), &mut b)
                .unwrap();
            assert_eq!(a, b, "image {i} {:?}", aug.crop);
            assert!(a.iter().all(|v| v.is_finite()));
        }
    }
    // 64x48 photo: the centre square is columns 8..56. RandomResizedCrop on the photo
    // reaches both side strips.
    let aug = Augment::v2(16, &m, &s).unwrap();
    let (mut left, mut right) = (false, false);
    let mut r = rng(3);
    for _ in 0..400 {
        let p = aug.sample(3, 48, 64, &mut r).unwrap();
        let (_, x, _, w) = p.region;
        left |= x < 8;
        right |= x + w > 56;
        assert!(x + w <= 64 && p.region.0 + p.region.2 <= 48);
    }
    assert!(left && right, "crops never left the centre square");
}

/// `Resize(r)` + `CenterCrop(s)`: only the window is computed, and it equals resizing the
/// whole photo and cutting the window out, to the bit.
#[test]
fn eval_photo_is_resize_then_center_crop() {
    let (w, h) = (50usize, 37usize);
    let chw: Vec<u8> = (0..3 * w * h).map(|i| (i * 31 % 256) as u8).collect();
    let aug = Augment::eval_photo(16, &[0.0; 3], &[1.0; 3]).unwrap();
    assert_eq!(aug.crop, Crop::ResizeCenter { resize: 18 });
    let p = aug.sample(3, h, w, &mut rng(0)).unwrap();
    // Shorter side 37 -> 18, longer 50 -> int(18 * 50 / 37) = 24.
    assert_eq!(p.resize, Some((18, 24)));
    assert_eq!(p.region, (0, 0, h, w));
    let mut got = vec![0.0f32; 3 * 16 * 16];
    aug.apply_params(&chw, 3, h, w, &p, &mut got).unwrap();
    let mut full = vec![0.0f32; 3 * 18 * 24];
    augment::resized_crop(&chw, 3, h, w, (0, 0, h, w), 18, 24, &mut full);
    // Centre window: offsets round((18 - 16) / 2) = 1 and round((24 - 16) / 2) = 4.
    let mut want = vec![0.0f32; 3 * 16 * 16];
    for c in 0..3 {
        for y in 0..16 {
            for x in 0..16 {
                want[(c * 16 + y) * 16 + x] = full[(c * 18 + y + 1) * 24 + x + 4];
            }
        }
    }
    assert_eq!(got, want);
    assert_eq!(augment::resize_shorter_side(37, 50, 18), (18, 24));
    assert_eq!(augment::resize_shorter_side(375, 500, 256), (256, 341));
    // A resize smaller than the view is refused.
    let mut bad = aug.clone();
    bad.crop = Crop::ResizeCenter { resize: 15 };
    assert!(bad.validate().is_err());
}

fn batches(l: &Loader, epoch: u64) -> Vec<moco::data::Batch> {
    let mut it = l.epoch(epoch);
    let mut out = Vec::new();
    while let Some(b) = it.try_next() {
        out.push(b.unwrap());
    }
    out
}

#[test]
fn folder_batches_are_worker_independent_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    make_photos(dir.path(), 6);
    let src = Source::from(index(dir.path(), BadImages::Error));
    let aug = Augment::v2(16, src.mean(), src.std()).unwrap();
    let one = Loader::train(src.clone(), aug.clone(), 4, 9)
        .unwrap()
        .workers(1)
        .unwrap();
    let three = Loader::train(src.clone(), aug, 4, 9)
        .unwrap()
        .workers(3)
        .unwrap();
    let a = batches(&one, 2);
    assert_eq!(a.len(), 3);
    assert_eq!(a, batches(&three, 2));
    assert_ne!(a[0].x_q, a[0].x_k, "two different views of one decode");
    let resumed = one.epoch_from(2, 1).unwrap().next().unwrap();
    assert_eq!(resumed, a[1]);
    for b in &a {
        for (&i, &l) in b.indices.iter().zip(&b.labels) {
            assert_eq!(src.labels()[i], l);
        }
    }
}

/// A file that vanishes or turns corrupt after the listing: `error` stops the epoch naming
/// it; `skip` replaces it by the next image, counts and logs it; no data left is an error,
/// never a hang.
#[test]
fn files_that_go_bad_mid_run_are_errors_or_replaced_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    make_photos(dir.path(), 4);
    let gone: PathBuf;
    {
        let src = Source::from(index(dir.path(), BadImages::Error));
        gone = src.path(2).unwrap().to_path_buf();
        std::fs::remove_file(&gone).unwrap();
        let aug = Augment::eval_photo(8, src.mean(), src.std()).unwrap();
        let l = Loader::eval(src, aug, 3).unwrap();
        let mut it = l.epoch(0);
        let first = it.try_next().unwrap();
        match first {
            Err(Error::Io { path, .. }) => assert_eq!(path, gone),
            other => panic!("expected an I/O error naming {}: {other:?}", gone.display()),
        }
    }
    // Skip: the same folder, one file gone and one truncated.
    let ix = index(dir.path(), BadImages::Skip);
    let cut = ix.path(5).unwrap().to_path_buf();
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(ix.path(1).unwrap()).unwrap();
    let src = Source::from(ix);
    let aug = Augment::eval_photo(8, src.mean(), src.std()).unwrap();
    let l = Loader::eval(src.clone(), aug.clone(), 3).unwrap();
    let all = batches(&l, 0);
    assert_eq!(all.iter().map(|b| b.n).sum::<usize>(), 7);
    let used: Vec<usize> = all.iter().flat_map(|b| b.indices.clone()).collect();
    // 1 -> 2, 5 -> 6.
    assert_eq!(used, vec![0, 2, 2, 3, 4, 6, 6]);
    let Source::Folder(f) = &src else {
        unreachable!()
    };
    let log = f.skip_log();
    assert_eq!(log.count, 2);
    assert!(log.first.iter().any(|e| e.contains("001.png")), "{log:?}");
    assert!(log.first.iter().any(|e| e.contains("002.png")), "{log:?}");
    // Every file gone: an error that says so.
    for i in 0..src.len() {
        let _ = std::fs::remove_file(src.path(i).unwrap());
    }
    let l = Loader::eval(src, aug, 3).unwrap();
    let e = l.epoch(0).try_next().unwrap().unwrap_err().to_string();
    assert!(e.contains("in a row"), "{e}");
}

/// Entries named like images that are not readable regular files, class folders whose
/// names are not UTF-8, and test classes missing from `train/` are never silent.
#[cfg(unix)]
#[test]
fn hostile_folder_entries_are_reported() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make_photos(root, 2);
    let d = root.join("train/a");
    std::fs::create_dir(d.join("dir.png")).unwrap();
    let fifo = std::ffi::CString::new(d.join("pipe.png").as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo reads a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    std::os::unix::fs::symlink(d.join("missing.png"), d.join("broken.png")).unwrap();
    std::os::unix::fs::symlink(d.join("loop.png"), d.join("loop.png")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", d.join("zero.png")).unwrap();
    let e = FolderIndex::open(root, true, BadImages::Error).unwrap_err();
    assert!(matches!(e, Error::Data { .. }), "{e}");
    let (ix, skipped) = FolderIndex::open(root, true, BadImages::Skip).unwrap();
    assert_eq!(ix.len(), 4);
    let names: Vec<String> = skipped
        .iter()
        .map(|s| s.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for n in ["dir.png", "pipe.png", "broken.png", "loop.png", "zero.png"] {
        assert!(
            names.contains(&n.to_string()),
            "{n} not reported: {names:?}"
        );
    }
    // A pipe swapped in after the listing is refused when read, without blocking.
    let (ix, _) = FolderIndex::open(root, true, BadImages::Skip).unwrap();
    let victim = ix.path(0).unwrap().to_path_buf();
    std::fs::remove_file(&victim).unwrap();
    let c = std::ffi::CString::new(victim.as_os_str().as_bytes()).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = ix.load(0).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    // A class folder named in bytes that are not UTF-8.
    let bad = tempfile::tempdir().unwrap();
    let odd = bad.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    std::fs::create_dir(&odd).unwrap();
    photo(&odd.join("x.png"), 8, 8, 1);
    let e = FolderIndex::open(bad.path(), true, BadImages::Skip)
        .unwrap_err()
        .to_string();
    assert!(e.contains("UTF-8"), "{e}");
    // A test class that the training split does not have.
    let extra = root.join("val/zebra");
    std::fs::create_dir_all(&extra).unwrap();
    photo(&extra.join("z.png"), 8, 8, 2);
    let e = FolderIndex::open(root, false, BadImages::Skip)
        .unwrap_err()
        .to_string();
    assert!(e.contains("zebra"), "{e}");
}

/// The seed's job in miniature: `--preset v2` (ResNet-50, 224 px views, v2 augmentation,
/// MLP head, T 0.2) trains two steps on a folder of non-square photos on the CPU, streamed,
/// and its kNN monitor runs on the photos with the eval transform.
#[test]
fn preset_v2_trains_on_a_photo_folder() {
    let bin = std::env::var("MOCO_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_moco").into());
    let dir = tempfile::tempdir().unwrap();
    make_photos(dir.path(), 4);
    let out = dir.path().join("run");
    let o = std::process::Command::new(&bin)
        .args(["train", "--preset", "v2", "--dataset", "folder", "--data"])
        .arg(dir.path())
        .args([
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--bn-splits",
            "2",
            "--moco-k",
            "16",
            "--workers",
            "2",
            "--quiet",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
    for want in [
        "\"arch\": \"resnet50\"",
        "\"image_size\": 224",
        "\"augment\": \"v2\"",
        "\"moco_t\": 0.2",
    ] {
        assert!(cfg.contains(want), "{want} not in {cfg}");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last = metrics.lines().last().unwrap();
    assert!(
        last.contains("\"epoch\":1") && last.contains("knn_top1"),
        "{last}"
    );
    assert!(
        !last.contains("NaN") && !last.contains("null,\"contrast"),
        "{last}"
    );
}
