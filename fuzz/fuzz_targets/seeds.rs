//! Writes the seed corpora `corpus/<target>/` from moco's own writers (not a fuzz target):
//! `cargo afl build --release && target/release/seeds corpus`.
use std::io::Write;
use std::path::Path;

use moco::train::checkpoint::{write_tensors, Tensor};
use moco::train::{CheckpointMeta, EpochSums, TrainConfig};

fn put(root: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn main() {
    let root = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: seeds DIR"));
    // idx
    let pixels: Vec<u8> = (0..2 * 4 * 3).map(|i| i as u8 * 9).collect();
    put(&root, "idx", "images", &idx(&[2, 4, 3], &pixels));
    put(&root, "idx", "images.gz", &gz(&idx(&[2, 4, 3], &pixels)));
    put(&root, "idx", "labels", &idx(&[5], &[0, 1, 2, 9, 3]));
    put(&root, "idx", "labels.gz", &gz(&idx(&[5], &[0, 1, 2, 9, 3])));
    // cifar: mode byte (bit 0: CIFAR-100, bit 1: count expected, bits 2..: the count).
    let rec = |labels: &[u8], fill: u8| {
        let mut r = labels.to_vec();
        r.extend((0..3072).map(|p| (p as u8).wrapping_mul(fill)));
        r
    };
    let mut c10 = vec![0u8 | 2 | (2 << 2)];
    c10.extend(rec(&[3], 1));
    c10.extend(rec(&[9], 7));
    put(&root, "cifar", "cifar10", &c10);
    let mut c100 = vec![1u8];
    c100.extend(rec(&[1, 99], 3));
    put(&root, "cifar", "cifar100", &c100);
    // image: size byte, then a PNG or JPEG.
    let rgb = image::RgbImage::from_fn(12, 9, |x, y| image::Rgb([x as u8 * 20, y as u8 * 25, 77]));
    let mut png = vec![8u8];
    image::DynamicImage::ImageRgb8(rgb.clone())
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let png = [&[8u8][..], &png[1..]].concat();
    put(&root, "image", "rgb.png", &png);
    let grey = image::GrayImage::from_fn(5, 17, |x, y| image::Luma([(x * y) as u8 * 3]));
    let mut g = Vec::new();
    image::DynamicImage::ImageLuma8(grey)
        .write_to(&mut std::io::Cursor::new(&mut g), image::ImageFormat::Png)
        .unwrap();
    put(&root, "image", "grey.png", &[&[4u8][..], &g].concat());
    let mut j = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut j, 80)
        .encode_image(&rgb)
        .unwrap();
    put(&root, "image", "rgb.jpg", &[&[6u8][..], &j].concat());
    // config: mode byte (even: TOML, odd: JSON).
    let toml = "preset = \"cifar\"\nepochs = 3\nlr = 0.5\nmilestones = [1, 2]\nbad_images = \"skip\"\ndata = \"/tmp/x\"\n";
    put(
        &root,
        "config",
        "cifar.toml",
        &[&[0u8][..], toml.as_bytes()].concat(),
    );
    let json = serde_json::to_string(&TrainConfig::default()).unwrap();
    put(
        &root,
        "config",
        "default.json",
        &[&[1u8][..], json.as_bytes()].concat(),
    );
    // checkpoint: a small file with the real metadata and a few tensors.
    let meta = CheckpointMeta {
        version: moco::VERSION.into(),
        config: TrainConfig::default(),
        epoch: 1,
        step_in_epoch: 2,
        global_step: 9,
        queue_ptr: 64,
        in_channels: 3,
        num_batches_tracked: (9, 9),
        epoch_sums: EpochSums {
            loss: 1.5,
            accuracy: 0.25,
            steps: 2,
            images: 128,
            seconds: 0.5,
        },
        rng: "pure(seed, epoch, step, index)".into(),
    };
    let tensors = vec![
        Tensor::new(
            "encoder_q.params",
            vec![3, 2],
            vec![0.5, -1.0, 2.0, 0.0, 1e-3, 7.0],
        )
        .unwrap(),
        Tensor::new("queue", vec![2, 2], vec![0.6, 0.8, 1.0, 0.0]).unwrap(),
        Tensor::new("step", vec![], vec![9.0]).unwrap(),
    ];
    let tmp = std::env::temp_dir().join(format!("moco-seed-{}.safetensors", std::process::id()));
    write_tensors(&tmp, &tensors, Some(&serde_json::to_value(&meta).unwrap())).unwrap();
    put(
        &root,
        "checkpoint",
        "run.safetensors",
        &std::fs::read(&tmp).unwrap(),
    );
    write_tensors(&tmp, &tensors[2..], None).unwrap();
    put(
        &root,
        "checkpoint",
        "plain.safetensors",
        &std::fs::read(&tmp).unwrap(),
    );
    std::fs::remove_file(&tmp).unwrap();
}
