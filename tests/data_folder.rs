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
