//! Replays the fuzz seed corpora (`fuzz/corpus/<target>/`) and every input the fuzzers
//! found a failure with (`fuzz/regressions/<target>/`) through the same entry points as
//! the fuzz targets in `fuzz/fuzz_targets/`: none may panic, and what loads must be
//! consistent. See fuzz/README.md.
use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = root.join(kind).join(target);
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd {
                let p = e.unwrap().path();
                if p.is_file() {
                    out.push(p);
                }
            }
        }
    }
    out.sort();
    out
}

fn each(target: &str, f: impl Fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target}");
    for p in files {
        let data = std::fs::read(&p).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&data)));
        assert!(r.is_ok(), "{} panicked", p.display());
    }
}

#[test]
fn idx() {
    each("idx", |data| {
        let path = Path::new("fuzz.idx");
        if let Ok((dims, pixels)) = moco::data::idx::read_idx_stream(path, data, data.len() as u64)
        {
            assert_eq!(dims.iter().product::<usize>(), pixels.len());
            if let [n, h, w] = dims[..] {
                if h > 0 && w > 0 {
                    let labels = vec![0u32; n];
                    moco::data::Dataset::new("fuzz", 1, h, w, pixels, labels, 10).unwrap();
                }
            }
        }
    });
}

#[test]
fn cifar() {
    each("cifar", |data| {
        let Some((&mode, file)) = data.split_first() else {
            return;
        };
        let (label_bytes, classes) = if mode & 1 == 0 { (1, 10) } else { (2, 100) };
        let expected = if mode & 2 == 0 {
            None
        } else {
            Some((mode >> 2) as usize)
        };
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        let r = moco::data::cifar::parse_records(
            Path::new("fuzz.bin"),
            file,
            label_bytes,
            classes,
            expected,
            &mut images,
            &mut labels,
        );
        if r.is_ok() {
            moco::data::Dataset::new("fuzz", 3, 32, 32, images, labels, classes).unwrap();
        }
    });
}

#[test]
fn image() {
    each("image", |data| {
        let Some((&s, file)) = data.split_first() else {
            return;
        };
        let size = 1 + (s as usize % 64);
        if let Ok(img) = moco::data::folder::decode_image(file, Path::new("fuzz.img"), size) {
            assert_eq!(img.len(), 3 * size * size);
        }
    });
}

#[test]
fn config() {
    let dir = tempfile::tempdir().unwrap();
    each("config", |data| {
        let Some((&mode, text)) = data.split_first() else {
            return;
        };
        let path = dir
            .path()
            .join(if mode & 1 == 0 { "c.toml" } else { "c.json" });
        std::fs::write(&path, text).unwrap();
        if let Ok(cfg) = moco::train::TrainConfig::load(&path) {
            cfg.validate().unwrap();
            let back = cfg.save(dir.path()).unwrap();
            let again = moco::train::TrainConfig::load(&back).unwrap();
            assert_eq!(format!("{cfg:?}"), format!("{again:?}"));
        }
    });
}

#[test]
fn checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(moco::train::CHECKPOINT_FILE);
    let mut loaded = 0;
    for p in inputs("checkpoint") {
        let data = std::fs::read(&p).unwrap();
        std::fs::write(&path, &data).unwrap();
        if let Ok((tensors, _)) = moco::train::checkpoint::read_tensors(&path) {
            for t in &tensors {
                assert_eq!(t.shape.iter().product::<usize>(), t.data.len());
            }
        }
        if moco::train::Trainer::<moco::backend::Cpu>::read_checkpoint(dir.path()).is_ok() {
            loaded += 1;
        }
    }
    assert!(
        loaded >= 1,
        "the seed checkpoint with metadata should load; if the checkpoint format changed, rewrite the seeds (fuzz/README.md)"
    );
}

/// Found by the `config` target: `{"weight_decay": 1e39}` loaded (an infinite f32), and
/// config.json then held `null`, so the run could not be resumed ("invalid type: null").
#[test]
fn config_with_an_infinite_float_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (key, v) in [("weight_decay", "1e39"), ("sgd_momentum", "-1e40")] {
        let p = dir.path().join("c.json");
        std::fs::write(&p, format!("{{\"{key}\": {v}}}")).unwrap();
        let e = moco::train::TrainConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("finite"), "{key}: {e}");
    }
}

/// Found by the `image` target: a progressive JPEG whose chroma sampling factors (4x1)
/// exceed the luma's (2x2) makes zune-jpeg 0.5.15 panic in its upsampler ("assertion
/// failed: input.len() * 2 <= scratch_space.len()"), which aborted the folder loader.
/// It is an error naming the file now.
#[test]
fn jpeg_that_panics_the_decoder_is_an_error() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/image");
    let data = std::fs::read(root.join("zune-upsampler-panic.jpg")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    let f = dir.path().join("a/x.jpg");
    std::fs::write(&f, &data[1..]).unwrap(); // without the fuzz target's size byte
    match moco::data::folder::load(dir.path(), true, 17) {
        Err(moco::Error::Data { path, message }) => {
            assert_eq!(path, f);
            assert!(message.contains("decoder failed"), "{message}");
        }
        other => panic!("expected a Data error, got {other:?}"),
    }
}

/// Found by the `image` target: 373-byte progressive JPEGs declaring up to 5391 x 12801
/// pixels, which zune-jpeg pads into a full image: 2-5 s and 160-340 MB each. A file too
/// short for one bit per 8x8 block is an error now, found in microseconds.
#[test]
fn tiny_jpeg_declaring_a_huge_image_is_refused_fast() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/image");
    let mut n = 0;
    for e in std::fs::read_dir(&root).unwrap() {
        let p = e.unwrap().path();
        if !p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("slow-")
        {
            continue;
        }
        n += 1;
        let data = std::fs::read(&p).unwrap();
        let t0 = std::time::Instant::now();
        let e = moco::data::folder::decode_image(&data[1..], &p, 16).unwrap_err();
        assert!(
            t0.elapsed().as_millis() < 200,
            "{}: {:?}",
            p.display(),
            t0.elapsed()
        );
        assert!(e.to_string().contains("needs at least"), "{e}");
    }
    assert_eq!(n, 4);
}
