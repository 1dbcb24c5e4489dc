//! Checkpoints (safetensors), metrics (JSON lines) and plots.
use std::path::Path;

use moco::train::checkpoint::{read_tensors, write_tensors, Tensor, METADATA_KEY};
use moco::train::metrics::{read_metrics, EpochMetrics, MetricsLog, METRICS_FILE};
use moco::train::plot::{plot_metrics, plot_metrics_without_text};
use moco::Error;
use serde_json::json;

fn t(name: &str, shape: &[usize], data: Vec<f32>) -> Tensor {
    Tensor {
        name: name.into(),
        shape: shape.to_vec(),
        data,
    }
}

fn sample_tensors() -> Vec<Tensor> {
    vec![
        t(
            "layer1.0.conv1.weight",
            &[2, 3, 1, 1],
            vec![1.0, -2.5, 3.25, f32::MIN_POSITIVE, -0.0, 1e30],
        ),
        t("bn1.running_mean", &[3], vec![0.1, 0.2, 0.3]),
        t("num_batches_tracked", &[], vec![42.0]),
        t("empty", &[0, 4], vec![]),
    ]
}

fn sorted(mut v: Vec<Tensor>) -> Vec<Tensor> {
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

fn assert_bits_eq(a: &[Tensor], b: &[Tensor]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.name, y.name);
        assert_eq!(x.shape, y.shape);
        let xb: Vec<u32> = x.data.iter().map(|v| v.to_bits()).collect();
        let yb: Vec<u32> = y.data.iter().map(|v| v.to_bits()).collect();
        assert_eq!(xb, yb, "tensor {}", x.name);
    }
}

#[test]
fn checkpoint_round_trip_sorted_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    let tensors = sample_tensors();
    write_tensors(&path, &tensors, None).unwrap();
    let (back, meta) = read_tensors(&path).unwrap();
    assert_eq!(meta, None);
    assert_bits_eq(&back, &sorted(tensors));
    // The scalar keeps its empty shape.
    let scalar = back
        .iter()
        .find(|t| t.name == "num_batches_tracked")
        .unwrap();
    assert!(scalar.shape.is_empty());
    assert_eq!(scalar.data, [42.0]);
    // No temporary file is left behind.
    assert!(!dir.path().join("a.safetensors.tmp").exists());
}

#[test]
fn checkpoint_round_trip_large_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let n = 3 * 1024 * 1024 + 7;
    let data: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let tensors = vec![t("fc.weight", &[n], data), t("fc.bias", &[1], vec![0.5])];
    write_tensors(&path, &tensors, Some(&json!({"epoch": 1}))).unwrap();
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(len >= 4 * (n + 1), "file is only {len} bytes");
    let (back, _) = read_tensors(&path).unwrap();
    assert_bits_eq(&back, &sorted(tensors));
}

#[test]
fn checkpoint_file_layout_is_standard_safetensors() {
    // Check the bytes by hand: u64 LE header length, JSON header, little-endian F32 data.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layout.safetensors");
    write_tensors(
        &path,
        &[t("w", &[2], vec![1.0, -2.0])],
        Some(&json!({"arch": "resnet18"})),
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["w"]["dtype"], "F32");
    assert_eq!(header["w"]["shape"], json!([2]));
    assert_eq!(header["w"]["data_offsets"], json!([0, 8]));
    let meta_str = header["__metadata__"][METADATA_KEY].as_str().unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(meta_str).unwrap(),
        json!({"arch": "resnet18"})
    );
    let data = &bytes[8 + n..];
    assert_eq!(
        data,
        [1.0f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat()
    );
}

#[test]
fn checkpoint_metadata_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let meta = json!({
        "epoch": 7,
        "arch": "resnet18",
        "lr": 0.03,
        "queue_ptr": 4096,
        "config": {"dim": 128, "t": 0.07, "mlp": false, "names": ["a", "ü"]},
        "null": null
    });
    write_tensors(&path, &sample_tensors(), Some(&meta)).unwrap();
    let (_, back) = read_tensors(&path).unwrap();
    assert_eq!(back, Some(meta));

    // Metadata without tensors works too.
    let path2 = dir.path().join("only-meta.safetensors");
    write_tensors(&path2, &[], Some(&json!([1, 2]))).unwrap();
    let (tensors, back) = read_tensors(&path2).unwrap();
    assert!(tensors.is_empty());
    assert_eq!(back, Some(json!([1, 2])));
}

#[test]
fn checkpoint_overwrite_replaces_previous() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    write_tensors(&path, &sample_tensors(), Some(&json!({"epoch": 1}))).unwrap();
    let second = vec![t("x", &[1], vec![9.0])];
    write_tensors(&path, &second, None).unwrap();
    let (back, meta) = read_tensors(&path).unwrap();
    assert_eq!(back, second);
    assert_eq!(meta, None);
}

#[test]
fn checkpoint_failed_write_keeps_previous_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keep.safetensors");
    let good = sample_tensors();
    write_tensors(&path, &good, Some(&json!({"epoch": 1}))).unwrap();
    let before = std::fs::read(&path).unwrap();

    let bad_len = vec![
        t("ok", &[2], vec![1.0, 2.0]),
        t("bad", &[2, 2], vec![1.0; 3]),
    ];
    let err = write_tensors(&path, &bad_len, Some(&json!({"epoch": 2}))).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("bad"), "{err}");

    let dup = vec![t("w", &[1], vec![1.0]), t("w", &[1], vec![2.0])];
    let err = write_tensors(&path, &dup, None).unwrap_err();
    assert!(err.to_string().contains("duplicate"), "{err}");

    let unnamed = vec![t("", &[1], vec![1.0])];
    assert!(write_tensors(&path, &unnamed, None).is_err());

    // The file is byte-identical and still readable; no temporary file remains.
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let (back, meta) = read_tensors(&path).unwrap();
    assert_bits_eq(&back, &sorted(good));
    assert_eq!(meta, Some(json!({"epoch": 1})));
    assert!(!dir.path().join("keep.safetensors.tmp").exists());
}

#[test]
fn checkpoint_io_failure_keeps_previous_file() {
    // The temporary file cannot be created (a directory is in its way): the write fails
    // after validation and the existing checkpoint is untouched.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.safetensors");
    write_tensors(&path, &sample_tensors(), None).unwrap();
    let before = std::fs::read(&path).unwrap();
    std::fs::create_dir(dir.path().join("k.safetensors.tmp")).unwrap();
    let err = write_tensors(&path, &[t("x", &[1], vec![1.0])], None).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("k.safetensors.tmp"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    read_tensors(&path).unwrap();

    // A missing directory is an I/O error too.
    let missing = dir.path().join("no/such/dir/x.safetensors");
    assert!(matches!(
        write_tensors(&missing, &[], None).unwrap_err(),
        Error::Io { .. }
    ));
}

fn assert_data_error(path: &Path) -> Error {
    let err = read_tensors(path).unwrap_err();
    assert!(matches!(err, Error::Data { .. }), "{err:?}");
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(err.to_string().contains(name), "{err} should name {name}");
    err
}

#[test]
fn checkpoint_truncated_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.safetensors");
    write_tensors(&path, &sample_tensors(), Some(&json!({"epoch": 3}))).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Cut in the data, in the header, in the length prefix, and to nothing.
    for cut in [bytes.len() - 1, bytes.len() - 4, 8 + header_len / 2, 5, 0] {
        let p = dir.path().join(format!("cut{cut}.safetensors"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert_data_error(&p);
    }
}

#[test]
fn checkpoint_garbage_and_missing_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(
        &garbage,
        b"this is not a safetensors file, just some text.....",
    )
    .unwrap();
    assert_data_error(&garbage);

    // A plausible length prefix followed by garbage.
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{not json at all");
    let bad_header = dir.path().join("badheader.safetensors");
    std::fs::write(&bad_header, &bytes).unwrap();
    assert_data_error(&bad_header);

    // A huge length prefix must not allocate or panic.
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b' '; 64]);
    let huge = dir.path().join("huge.safetensors");
    std::fs::write(&huge, &bytes).unwrap();
    assert_data_error(&huge);

    let missing = dir.path().join("missing.safetensors");
    let err = read_tensors(&missing).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("missing.safetensors"));
}

/// Writes a safetensors file by hand from a JSON header and data bytes.
fn write_raw(path: &Path, header: serde_json::Value, data: &[u8]) {
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn checkpoint_rejects_non_f32_shape_mismatch_and_bad_metadata() {
    let dir = tempfile::tempdir().unwrap();

    // A hand-written valid file is read (checks the reader independently of the writer).
    let ok = dir.path().join("ok.safetensors");
    write_raw(
        &ok,
        json!({"b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
               "a": {"dtype": "F32", "shape": [], "data_offsets": [4, 8]}}),
        &[2.0f32.to_le_bytes(), 3.0f32.to_le_bytes()].concat(),
    );
    let (tensors, meta) = read_tensors(&ok).unwrap();
    assert_eq!(meta, None);
    assert_eq!(
        tensors,
        vec![t("a", &[], vec![3.0]), t("b", &[1], vec![2.0])]
    );

    let f16 = dir.path().join("f16.safetensors");
    write_raw(
        &f16,
        json!({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}),
        &[0u8; 4],
    );
    let err = assert_data_error(&f16);
    assert!(err.to_string().contains("F16"), "{err}");

    let mismatch = dir.path().join("mismatch.safetensors");
    write_raw(
        &mismatch,
        json!({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}),
        &[0u8; 8],
    );
    assert_data_error(&mismatch);

    let bad_meta = dir.path().join("badmeta.safetensors");
    write_raw(
        &bad_meta,
        json!({"__metadata__": {"moco": "{epoch: 1"},
               "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}),
        &[0u8; 4],
    );
    let err = assert_data_error(&bad_meta);
    assert!(err.to_string().contains("metadata"), "{err}");

    // Foreign metadata keys are ignored.
    let foreign = dir.path().join("foreign.safetensors");
    write_raw(
        &foreign,
        json!({"__metadata__": {"format": "pt"},
               "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}),
        &1.5f32.to_le_bytes(),
    );
    assert_eq!(read_tensors(&foreign).unwrap().1, None);
}

#[test]
fn checkpoint_tensor_new_validates() {
    assert!(Tensor::new("s", vec![], vec![1.0]).is_ok());
    assert!(Tensor::new("s", vec![], vec![]).is_err());
    assert!(Tensor::new("", vec![1], vec![1.0]).is_err());
    assert!(Tensor::new("big", vec![usize::MAX, 2], vec![]).is_err());
}

fn record(epoch: usize) -> EpochMetrics {
    EpochMetrics {
        epoch,
        loss: (epoch > 0).then(|| 8.0 / (epoch as f64 + 1.0)),
        contrast_acc: (epoch > 0).then_some(0.1 * epoch as f64),
        knn_top1: Some(0.1 + 0.05 * epoch as f64),
        images_per_sec: (epoch > 0).then_some(1234.5),
        seconds: 2.0 + epoch as f64,
        lr: (epoch > 0).then_some(0.03),
    }
}

#[test]
fn metrics_lines_have_all_keys_and_nulls() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::open(dir.path(), false, 0).unwrap();
    for e in 0..3 {
        log.append(&record(e)).unwrap();
    }
    let path = dir.path().join(METRICS_FILE);
    assert_eq!(log.path(), path);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(text.ends_with('\n'));
    for (e, line) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let obj = v.as_object().unwrap();
        for key in [
            "epoch",
            "loss",
            "contrast_acc",
            "knn_top1",
            "images_per_sec",
            "seconds",
            "lr",
        ] {
            assert!(obj.contains_key(key), "line {e} lacks {key}: {line}");
        }
        assert_eq!(v["epoch"], json!(e));
    }
    let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert!(first["loss"].is_null());
    assert!(first["images_per_sec"].is_null());
    assert_eq!(first["knn_top1"], json!(0.1));

    let back = read_metrics(&path).unwrap();
    assert_eq!(back, (0..3).map(record).collect::<Vec<_>>());
    assert_eq!(log.records(), &back[..]);
}

#[test]
fn metrics_open_truncates_or_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(METRICS_FILE);
    let mut log = MetricsLog::open(dir.path(), false, 0).unwrap();
    for e in 0..5 {
        log.append(&record(e)).unwrap();
    }
    drop(log);

    // Resume from the checkpoint of epoch 2: epochs 3 and 4 are dropped and rewritten.
    let mut log = MetricsLog::open(dir.path(), true, 3).unwrap();
    assert_eq!(log.records(), &(0..3).map(record).collect::<Vec<_>>()[..]);
    assert_eq!(read_metrics(&path).unwrap().len(), 3);
    let mut redone = record(3);
    redone.loss = Some(0.5);
    log.append(&redone).unwrap();
    let back = read_metrics(&path).unwrap();
    assert_eq!(back.len(), 4);
    assert_eq!(back[3], redone);
    assert_eq!(log.records(), &back[..]);
    drop(log);

    // Resume keeping everything.
    let log = MetricsLog::open(dir.path(), true, usize::MAX).unwrap();
    assert_eq!(log.records().len(), 4);
    drop(log);

    // A fresh run truncates.
    let log = MetricsLog::open(dir.path(), false, 100).unwrap();
    assert!(log.records().is_empty());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");

    // Resume with no file at all, in a directory that does not exist yet.
    let sub = dir.path().join("new/run");
    let mut log = MetricsLog::open(&sub, true, 10).unwrap();
    assert!(log.records().is_empty());
    log.append(&record(0)).unwrap();
    assert_eq!(
        read_metrics(&sub.join(METRICS_FILE)).unwrap(),
        vec![record(0)]
    );
}

#[test]
fn metrics_resume_drops_a_torn_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(METRICS_FILE);
    let mut log = MetricsLog::open(dir.path(), false, 0).unwrap();
    log.append(&record(0)).unwrap();
    log.append(&record(1)).unwrap();
    drop(log);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"epoch\":2,\"lo");
    std::fs::write(&path, &text).unwrap();
    assert!(read_metrics(&path).is_err());
    let log = MetricsLog::open(dir.path(), true, 10).unwrap();
    assert_eq!(log.records(), &[record(0), record(1)]);
    assert_eq!(read_metrics(&path).unwrap().len(), 2);
}

#[test]
fn metrics_bad_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.jsonl");
    let good = serde_json::to_string(&record(1)).unwrap();
    std::fs::write(&path, format!("{good}\n\n{{\"epoch\": \"two\"}}\n")).unwrap();
    let err = read_metrics(&path).unwrap_err();
    assert!(matches!(err, Error::Data { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("m.jsonl") && msg.contains("line 3"), "{msg}");

    // Resuming over a corrupt (complete) line is an error, not silent data loss.
    std::fs::write(dir.path().join(METRICS_FILE), "not json\n").unwrap();
    let err = MetricsLog::open(dir.path(), true, 10).unwrap_err();
    assert!(err.to_string().contains("line 1"), "{err}");

    let err = read_metrics(&dir.path().join("none.jsonl")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
}

#[test]
fn metrics_non_finite_values_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::open(dir.path(), false, 0).unwrap();
    let mut m = record(1);
    m.loss = Some(f64::NAN);
    assert!(log.append(&m).is_err());
    m.loss = Some(1.0);
    m.seconds = f64::INFINITY;
    assert!(log.append(&m).is_err());
    assert!(log.records().is_empty());
    assert_eq!(
        std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap(),
        ""
    );
}

fn png_info(path: &Path) -> (u32, u32, usize) {
    let bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        path.display()
    );
    let img = image::load_from_memory(&bytes).unwrap();
    (img.width(), img.height(), bytes.len())
}

/// Pixels that are neither white nor grey (i.e. belong to a coloured curve).
fn coloured_pixels(path: &Path) -> (usize, usize) {
    let img = image::open(path).unwrap().to_rgb8();
    let (mut blue, mut red) = (0, 0);
    for p in img.pixels() {
        let [r, g, b] = p.0;
        if b > 150 && r < 100 && g < 100 {
            blue += 1;
        }
        if r > 150 && b < 100 && g < 100 {
            red += 1;
        }
    }
    (blue, red)
}

#[test]
fn plot_writes_png() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("curves.png");
    let records: Vec<_> = (0..6).map(record).collect();
    plot_metrics(&records, &path, "MoCo v1, ResNet-18, synthetic").unwrap();
    let (w, h, len) = png_info(&path);
    assert_eq!((w, h), (900, 450));
    assert!(len > 1024, "PNG is only {len} bytes");
    let (blue, red) = coloured_pixels(&path);
    assert!(
        blue > 200 && red > 200,
        "curves missing: blue {blue}, red {red}"
    );
    assert!(!dir.path().join("curves.png.tmp").exists());

    // Overwriting works; unsorted input and a single record are fine.
    let mut rev = records.clone();
    rev.reverse();
    plot_metrics(&rev, &path, "").unwrap();
    plot_metrics(&records[..1], &path, "one").unwrap();
    png_info(&path);
}

#[test]
fn plot_without_text_writes_png() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.png");
    let records: Vec<_> = (0..4).map(record).collect();
    plot_metrics_without_text(&records, &path).unwrap();
    let (w, h, len) = png_info(&path);
    assert_eq!((w, h), (900, 450));
    assert!(len > 1024, "PNG is only {len} bytes");
    let (blue, red) = coloured_pixels(&path);
    assert!(
        blue > 200 && red > 200,
        "curves missing: blue {blue}, red {red}"
    );
}

#[test]
fn plot_skips_none_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partial.png");
    // Loss only from epoch 1, kNN only on some epochs, and no loss at all in one panel.
    let mut records: Vec<_> = (0..6).map(record).collect();
    records[2].knn_top1 = None;
    records[4].knn_top1 = None;
    plot_metrics(&records, &path, "gaps").unwrap();
    png_info(&path);
    let (blue, red) = coloured_pixels(&path);
    assert!(blue > 100 && red > 100, "blue {blue}, red {red}");

    // Every loss missing: the loss panel is empty but the plot is still written.
    let none: Vec<_> = (0..3)
        .map(|e| EpochMetrics {
            loss: None,
            ..record(e)
        })
        .collect();
    plot_metrics(&none, &path, "no loss").unwrap();
    let (blue, red) = coloured_pixels(&path);
    assert_eq!(blue, 0, "no loss curve expected");
    assert!(red > 100);
}

#[test]
fn plot_empty_records_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.png");
    let err = plot_metrics(&[], &path, "nothing").unwrap_err();
    assert!(err.to_string().contains("no metrics"), "{err}");
    assert!(!path.exists());
    assert!(plot_metrics_without_text(&[], &path).is_err());
}
