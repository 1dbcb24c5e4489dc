//! The `moco` binary: a tiny end-to-end run (train, resume, eval, export) and error paths.
use std::path::Path;
use std::process::Command;

/// The binary under test; `MOCO_BIN` overrides it where the build path does not exist
/// (the GPU-check runner, which carries the binaries to another machine).
fn bin() -> String {
    std::env::var("MOCO_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_moco").to_string())
}

fn moco(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).output().expect("run moco");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
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
    "64",
    "--test-limit",
    "32",
    "--batch-size",
    "16",
    "--moco-k",
    "40",
    "--dim",
    "8",
    "--bn-splits",
    "2",
    "--quiet",
];

#[test]
fn train_resume_eval_export() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let d = dir.to_str().unwrap();
    let mut args = vec!["train", "--epochs", "1", "--out", d];
    args.extend_from_slice(TINY);
    let (ok, _, err) = moco(&args);
    assert!(ok, "train failed: {err}");
    for f in [
        "config.json",
        "metrics.jsonl",
        "checkpoint.safetensors",
        "metrics.png",
        "steps.jsonl",
    ] {
        assert!(dir.join(f).exists(), "{f} missing; stderr: {err}");
    }
    // A second train into the same directory refuses to overwrite it.
    let (ok, _, err) = moco(&args);
    assert!(!ok && err.contains("--resume"), "{err}");
    // Resume to 2 epochs.
    let (ok, _, err) = moco(&["train", "--resume", d, "--epochs", "2", "--quiet"]);
    assert!(ok, "resume failed: {err}");
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "epochs 0, 1, 2: {metrics}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["epoch"].as_u64().unwrap() as usize, i);
        for key in ["loss", "knn_top1", "images_per_sec", "seconds"] {
            assert!(l.get(key).is_some(), "line {i} lacks {key}");
        }
        let knn = l["knn_top1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&knn));
    }
    assert!(lines[0]["loss"].is_null() && lines[2]["loss"].as_f64().unwrap() > 0.0);
    let (ok, out, err) = moco(&["eval", "knn", "--checkpoint", d, "--device", "cpu"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        (v["knn_top1"].as_f64().unwrap() - lines[2]["knn_top1"].as_f64().unwrap()).abs() < 1e-6
    );
    let (ok, out, err) = moco(&[
        "eval",
        "linear",
        "--checkpoint",
        d,
        "--device",
        "cpu",
        "--epochs",
        "3",
        "--lr",
        "1",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["linear_top1"].as_f64().unwrap() <= v["linear_top5"].as_f64().unwrap());
    let q = dir.join("queue.safetensors");
    let (ok, _, err) = moco(&["export", "--checkpoint", d, "--queue", q.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (tensors, _) =
        moco::train::checkpoint::read_tensors(&dir.join("encoder_q.safetensors")).unwrap();
    assert!(tensors.iter().any(|t| t.name == "conv1.weight"));
    assert!(tensors.iter().any(|t| t.name == "layer1.0.bn2.running_var"));
    assert!(
        !tensors.iter().any(|t| t.name.starts_with("fc.")),
        "backbone only by default"
    );
    let (qt, _) = moco::train::checkpoint::read_tensors(&q).unwrap();
    assert_eq!(
        qt.iter().find(|t| t.name == "queue").unwrap().shape,
        vec![8, 40]
    );
}

#[test]
fn error_paths_are_messages_not_panics() {
    let cases: &[(&[&str], &str)] = &[
        (&["train", "--moco-k", "4", "--device", "cpu"], "--moco-k"),
        (&["train", "--moco-t", "0", "--device", "cpu"], "--moco-t"),
        (
            &["train", "--arch", "alexnet", "--device", "cpu"],
            "alexnet",
        ),
        (
            &[
                "train",
                "--dataset",
                "idx",
                "--device",
                "cpu",
                "--out",
                "/tmp/moco-cli-never",
            ],
            "path",
        ),
        (
            &[
                "train",
                "--dataset",
                "cifar10",
                "--data",
                "/nonexistent/dir",
                "--device",
                "cpu",
                "--out",
                "/tmp/moco-cli-never2",
            ],
            "/nonexistent/dir",
        ),
        (&["train", "--preset", "v9"], "v9"),
        (&["train", "--device", "tpu"], "tpu"),
        (
            &["eval", "knn", "--checkpoint", "/nonexistent/run"],
            "/nonexistent/run",
        ),
        (
            &["export", "--checkpoint", "/nonexistent/run"],
            "/nonexistent/run",
        ),
        (
            &["train", "--resume", "/nonexistent/run"],
            "/nonexistent/run",
        ),
        (&["bench", "--steps", "0"], "--steps"),
    ];
    for (args, needle) in cases {
        let (ok, _, err) = moco(args);
        assert!(!ok, "{args:?} should fail");
        assert!(
            err.contains(needle),
            "{args:?}: stderr {err:?} should mention {needle:?}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
    assert!(!Path::new("/tmp/moco-cli-never/checkpoint.safetensors").exists());
}

#[test]
fn help_lists_every_subcommand_and_flag() {
    let (ok, out, _) = moco(&["--help"]);
    assert!(ok);
    for s in ["train", "eval", "export", "bench", "info"] {
        assert!(out.contains(s), "--help lacks {s}");
    }
    let (ok, out, _) = moco(&["train", "--help"]);
    assert!(ok);
    for f in [
        "--dataset",
        "--data",
        "--arch",
        "--preset",
        "--epochs",
        "--batch-size",
        "--lr",
        "--moco-k",
        "--moco-m",
        "--moco-t",
        "--mlp",
        "--no-mlp",
        "--symmetric",
        "--bn-splits",
        "--seed",
        "--device",
        "--threads",
        "--out",
        "--resume",
        "--quiet",
        "--config",
    ] {
        assert!(out.contains(f), "train --help lacks {f}");
    }
}

#[test]
fn train_with_ranks_matches_one_rank_and_resumes_with_another_count() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| -> std::path::PathBuf {
        let dir = tmp.path().join(name);
        let d = dir.to_str().unwrap().to_string();
        let mut args = vec!["train", "--epochs", "1", "--out", &d];
        args.extend_from_slice(TINY);
        args.extend_from_slice(extra);
        let (ok, _, err) = moco(&args);
        assert!(ok, "train {extra:?} failed: {err}");
        dir
    };
    let one = run("one", &[]);
    let two = run("two", &["--ranks", "2"]);
    let knn = |dir: &Path| -> Vec<f64> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["knn_top1"].as_f64().unwrap()
            })
            .collect()
    };
    let (k1, k2) = (knn(&one), knn(&two));
    assert_eq!(k1.len(), 2);
    for (a, b) in k1.iter().zip(&k2) {
        assert!((a - b).abs() <= 1.0 / 32.0 + 1e-9, "kNN {k1:?} vs {k2:?}");
    }
    // The two-rank run continues as one rank.
    let d = two.to_str().unwrap();
    let (ok, _, err) = moco(&[
        "train", "--resume", d, "--epochs", "2", "--ranks", "1", "--quiet",
    ]);
    assert!(ok, "resume failed: {err}");
    assert_eq!(knn(&two).len(), 3);
    // Ranks that do not split the batch are refused before anything runs.
    let bad = tmp.path().join("bad");
    let mut args = vec!["train", "--out", bad.to_str().unwrap(), "--ranks", "3"];
    args.extend_from_slice(TINY);
    let (ok, _, err) = moco(&args);
    assert!(!ok && err.contains("--ranks 3 must divide"), "{err}");
    assert!(!bad.exists());
}

#[test]
fn multi_process_runs_refuse_what_they_cannot_do() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("r");
    let o = out.to_str().unwrap();
    let run_env = |vars: &[(&str, &str)], extra: &[&str]| {
        let mut args = vec!["train", "--out", o];
        args.extend_from_slice(TINY);
        args.extend_from_slice(extra);
        let out = Command::new(bin())
            .args(&args)
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A rank of a multi-process run on the CPU: there is no NCCL there.
    let (ok, err) = run_env(&[("WORLD_SIZE", "2"), ("RANK", "1")], &[]);
    assert!(!ok && err.contains("--ranks N"), "{err}");
    // A bad environment.
    let (ok, err) = run_env(&[("WORLD_SIZE", "2"), ("RANK", "2")], &[]);
    assert!(!ok && err.contains("RANK=2 is not in a world"), "{err}");
    let (ok, err) = run_env(&[("WORLD_SIZE", "two"), ("RANK", "0")], &[]);
    assert!(!ok && err.contains("WORLD_SIZE"), "{err}");
    // --gpus with no GPU, or together with --ranks.
    if moco::device::cuda_device_count() == 0 {
        let (ok, err) = run_env(&[], &["--gpus", "2"]);
        assert!(!ok && err.contains("has 0 GPU"), "{err}");
    }
    let (ok, err) = run_env(&[], &["--gpus", "2", "--ranks", "2"]);
    assert!(!ok && err.contains("one or the other"), "{err}");
    assert!(!out.exists(), "nothing was written");
}

/// Issue 31 item 5: a checkpoint or config that is a named pipe is refused at once, not
/// waited on (eval, export, resume and `--config` alike).
#[cfg(unix)]
#[test]
fn named_pipes_are_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let mkfifo = |p: &std::path::Path| {
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    };
    mkfifo(&run.join("checkpoint.safetensors"));
    let cfg = dir.path().join("pipe.json");
    mkfifo(&cfg);
    let run_s = run.to_str().unwrap();
    let out = dir.path().join("out.safetensors");
    let cases: [Vec<&str>; 4] = [
        vec!["eval", "knn", "--checkpoint", run_s],
        vec![
            "export",
            "--checkpoint",
            run_s,
            "--out",
            out.to_str().unwrap(),
        ],
        vec!["train", "--resume", run_s, "--epochs", "2", "--quiet"],
        vec!["train", "--config", cfg.to_str().unwrap(), "--quiet"],
    ];
    for args in cases {
        let mut child = Command::new(bin())
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if t.elapsed().as_secs() > 30 {
                child.kill().unwrap();
                child.wait().unwrap();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        let status = status.unwrap_or_else(|| panic!("{args:?} hung on a named pipe"));
        assert!(!status.success(), "{args:?} succeeded");
        assert!(err.contains("named pipe"), "{args:?}: {err}");
    }
}
