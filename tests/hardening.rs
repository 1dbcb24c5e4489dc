//! Issue 13's findings on the trainer, checkpoints and CLI: each test failed before its fix.
use std::path::Path;
use std::process::Command;

use moco::train::checkpoint::read_tensors;
use moco::train::{CHECKPOINT_FILE, PREV_CHECKPOINT_FILE};

fn bin() -> String {
    std::env::var("MOCO_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_moco").to_string())
}

fn moco(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin()).args(args).output().expect("run moco");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const TINY: &[&str] = &[
    "--device",
    "cpu",
    "--arch",
    "resnet8",
    "--image-size",
    "16",
    "--train-limit",
    "32",
    "--test-limit",
    "16",
    "--batch-size",
    "16",
    "--moco-k",
    "40",
    "--dim",
    "8",
    "--bn-splits",
    "2",
    "--knn-every",
    "0",
    "--quiet",
];

fn train(dir: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let d = dir.to_str().unwrap();
    let mut args = vec!["train", "--out", d];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    moco(&args)
}

fn all_finite(path: &Path) -> bool {
    let (tensors, _) = read_tensors(path).unwrap();
    tensors.iter().all(|t| t.first_non_finite().is_none())
}

#[test]
fn export_never_overwrites_the_run_or_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let (code, err) = train(&dir, &["--epochs", "1"]);
    assert_eq!(code, Some(0), "{err}");
    let ckpt = dir.join(CHECKPOINT_FILE);
    let before = std::fs::read(&ckpt).unwrap();
    let d = dir.to_str().unwrap();
    let c = ckpt.to_str().unwrap();
    let x = tmp.path().join("x.st");
    let xs = x.to_str().unwrap();
    let cases: &[&[&str]] = &[
        &["export", "--checkpoint", d, "--out", c],
        &["export", "--checkpoint", d, "--out", c, "--force"],
        &["export", "--checkpoint", d, "--queue", c],
        &["export", "--checkpoint", d, "--out", xs, "--queue", xs],
    ];
    for args in cases {
        let (code, err) = moco(args);
        assert_eq!(code, Some(1), "{args:?} must be refused: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(std::fs::read(&ckpt).unwrap(), before, "checkpoint intact");
    assert!(!x.exists());
    // An existing output needs --force.
    let (code, err) = moco(&["export", "--checkpoint", d, "--out", xs]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = moco(&["export", "--checkpoint", d, "--out", xs]);
    assert!(code == Some(1) && err.contains("--force"), "{err}");
    let (code, err) = moco(&["export", "--checkpoint", d, "--out", xs, "--force"]);
    assert_eq!(code, Some(0), "{err}");
    // The run still resumes.
    let (code, err) = moco(&["train", "--resume", d, "--epochs", "2", "--quiet"]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn divergence_leaves_a_finite_checkpoint_from_before_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    let (code, err) = train(&dir, &["--epochs", "3", "--lr", "1e30"]);
    assert_eq!(code, Some(1), "must diverge: {err}");
    assert!(err.contains("diverged"), "{err}");
    let ckpt = dir.join(CHECKPOINT_FILE);
    assert!(all_finite(&ckpt), "the checkpoint left behind is finite");
    // Weights of magnitude 1e29 are not a usable checkpoint either: the one left is from
    // before the step that exploded them (epoch 0 here).
    let (tensors, _) = read_tensors(&ckpt).unwrap();
    let p = tensors
        .iter()
        .find(|t| t.name == "encoder_q.params")
        .unwrap();
    let max = p.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(max < 1e3, "exploded weights were kept: max |w| = {max}");
    assert!(dir.join(PREV_CHECKPOINT_FILE).exists());
    let d = dir.to_str().unwrap();
    let out = tmp.path().join("e.st");
    let (code, err) = moco(&["export", "--checkpoint", d, "--out", out.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
}

/// Rewrites one tensor value of a checkpoint in place (as a flipped byte on disk would).
fn poke(path: &Path, name: &str, value: f32) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    let mut bytes = bytes;
    let at = 8 + n + start;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn corrupt_and_non_finite_checkpoints_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let (code, err) = train(&dir, &["--epochs", "1"]);
    assert_eq!(code, Some(0), "{err}");
    let ckpt = dir.join(CHECKPOINT_FILE);
    let good = std::fs::read(&ckpt).unwrap();
    let d = dir.to_str().unwrap();
    for name in ["encoder_q.params", "queue"] {
        std::fs::write(&ckpt, &good).unwrap();
        poke(&ckpt, name, 1.0e30);
        for args in [
            vec![
                "export",
                "--checkpoint",
                d,
                "--out",
                "/tmp/moco-hardening-never.st",
            ],
            vec!["eval", "knn", "--checkpoint", d, "--device", "cpu"],
            vec!["train", "--resume", d, "--epochs", "2", "--quiet"],
        ] {
            let (code, err) = moco(&args);
            assert_eq!(code, Some(1), "{args:?} accepted a corrupt {name}");
            assert!(
                err.contains("checksum") && err.contains(name),
                "{args:?}: {err}"
            );
        }
    }
    assert!(!Path::new("/tmp/moco-hardening-never.st").exists());
    // A non-finite value written with a valid checksum (a run that diverged) is refused too.
    std::fs::write(&ckpt, &good).unwrap();
    let (mut tensors, meta) = read_tensors(&ckpt).unwrap();
    tensors
        .iter_mut()
        .find(|t| t.name == "encoder_q.params")
        .unwrap()
        .data[3] = f32::NAN;
    moco::train::checkpoint::write_tensors(&ckpt, &tensors, meta.as_ref()).unwrap();
    let (code, err) = moco(&["eval", "knn", "--checkpoint", d, "--device", "cpu"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("non-finite") && err.contains("encoder_q.params"),
        "{err}"
    );
}

#[test]
fn resume_refuses_flags_it_cannot_honour() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let (code, err) = train(&dir, &["--epochs", "1"]);
    assert_eq!(code, Some(0), "{err}");
    let d = dir.to_str().unwrap();
    let config = std::fs::read(dir.join("config.json")).unwrap();
    let (code, err) = moco(&[
        "train",
        "--resume",
        d,
        "--moco-k",
        "512",
        "--batch-size",
        "64",
        "--lr",
        "5",
        "--arch",
        "resnet50",
        "--out",
        "/tmp/elsewhere",
    ]);
    assert_eq!(code, Some(1), "{err}");
    for flag in ["--moco-k", "--batch-size", "--lr", "--arch", "--out"] {
        assert!(err.contains(flag), "{flag} not listed: {err}");
    }
    assert_eq!(std::fs::read(dir.join("config.json")).unwrap(), config);
}

#[test]
fn resume_after_a_crash_logs_like_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let (code, err) = train(&dir, &["--epochs", "1"]);
    assert_eq!(code, Some(0), "{err}");
    // A crash during epoch 1 of a longer run: the checkpoint is from epoch 0, the logs
    // hold more than that (metrics of epoch 1, its steps).
    let ckpt = dir.join(CHECKPOINT_FILE);
    // Put back an epoch-0 checkpoint: what a crash in epoch 1 leaves.
    let epoch0 = dir.join(PREV_CHECKPOINT_FILE);
    let (_, meta) = read_tensors(&epoch0).unwrap();
    assert_eq!(meta.unwrap()["epoch"], 0);
    std::fs::copy(&epoch0, &ckpt).unwrap();
    let d = dir.to_str().unwrap();
    let (code, err) = moco(&["train", "--resume", d, "--epochs", "2", "--quiet"]);
    assert_eq!(code, Some(0), "{err}");
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let epochs: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(epochs, [0, 1, 2], "{metrics}");
    let steps = std::fs::read_to_string(dir.join("steps.jsonl")).unwrap();
    let ids: Vec<u64> = steps
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        ids,
        [1, 2, 3, 4],
        "2 steps per epoch, none repeated: {steps}"
    );
}

#[test]
fn a_config_that_cannot_fit_is_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    for (flags, needle) in [
        (&["--moco-k", "100000000000"][..], "queue"),
        (&["--dim", "100000000"][..], "model"),
        (
            &["--image-size", "1024", "--train-limit", "0"][..],
            "activations",
        ),
    ] {
        let dir = tmp.path().join("big");
        let mut args = vec!["train", "--device", "cpu", "--quiet", "--out"];
        args.push(dir.to_str().unwrap());
        args.extend_from_slice(flags);
        let (code, err) = moco(&args);
        assert_eq!(code, Some(1), "{flags:?}: {err}");
        assert!(
            err.contains("needs at least") && err.contains(needle),
            "{flags:?}: {err}"
        );
        assert!(!dir.exists(), "{flags:?} left a run directory behind");
    }
}

#[cfg(unix)]
#[test]
fn sigterm_saves_and_exits_130() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let d = dir.to_str().unwrap();
    let mut args = vec!["train", "--out", d, "--epochs", "50"];
    args.extend_from_slice(TINY);
    let mut child = Command::new(bin()).args(&args).spawn().unwrap();
    // Wait for the epoch-0 checkpoint, then send SIGTERM.
    let ckpt = dir.join(CHECKPOINT_FILE);
    for _ in 0..600 {
        if ckpt.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(ckpt.exists(), "no checkpoint appeared");
    // SAFETY: kill sends a signal to the child's pid, which we own and have not reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let (_, meta) = read_tensors(&ckpt).unwrap();
    let meta = meta.unwrap();
    assert!(meta["epoch"].as_u64().unwrap() < 50, "stopped early");
}

#[test]
fn toml_nan_and_eval_flags_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let toml = tmp.path().join("c.toml");
    std::fs::write(&toml, "lr = nan\n").unwrap();
    let e = moco::train::TrainConfig::load(&toml)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lr") && e.contains("finite"), "{e}");
    let (code, err) = moco(&["eval", "knn", "--checkpoint", "/nonexistent", "--k", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--k") && !err.contains("--knn-k"), "{err}");
}

#[test]
fn memory_estimate_counts_the_same_parameters_as_the_model() {
    use moco::model::{Arch, EncoderConfig, ParamTable};
    for arch in Arch::ALL {
        for mlp in [false, true] {
            for c in [1, 3] {
                let cfg = EncoderConfig {
                    arch,
                    in_channels: c,
                    dim: 128,
                    mlp,
                };
                let want = ParamTable::for_config(&cfg).unwrap().num_params() as u64;
                let got = moco::train::memory::encoder_size(arch, c, 128, mlp, 32).params;
                assert_eq!(got, want, "{arch} mlp {mlp} in {c}");
            }
        }
    }
}

/// Issue 31 item 9 (part): a config file with a UTF-8 byte-order mark (as some editors
/// write) reads as the same config without it; text that is not UTF-8 is a clear error.
#[test]
fn config_with_a_byte_order_mark_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, bom, bad) = (
        dir.path().join("plain.json"),
        dir.path().join("bom.json"),
        dir.path().join("bad.toml"),
    );
    std::fs::write(&plain, br#"{"batch_size": 48, "epochs": 3}"#).unwrap();
    std::fs::write(&bom, b"\xEF\xBB\xBF{\"batch_size\": 48, \"epochs\": 3}").unwrap();
    std::fs::write(&bad, b"epochs = 3\n\xFF\xFE").unwrap();
    let a = moco::train::TrainConfig::load(&plain).unwrap();
    let b = moco::train::TrainConfig::load(&bom).unwrap();
    assert_eq!((a.batch_size, a.epochs), (48, 3));
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap()
    );
    let e = moco::train::TrainConfig::load(&bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not UTF-8") && e.contains("bad.toml"), "{e}");
}
