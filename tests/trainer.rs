//! The trainer on the CPU: steps change the encoder, the kNN monitor runs, a run
//! interrupted and resumed ends bit-identical to an uninterrupted one, bad configs are errors.
use std::sync::atomic::AtomicBool;

use moco::backend::Cpu;
use moco::train::{TrainConfig, Trainer};

fn tiny() -> TrainConfig {
    TrainConfig {
        arch: moco::model::Arch::Resnet8,
        image_size: 16,
        train_limit: 96,
        test_limit: 48,
        batch_size: 16,
        moco_k: 40, // not a multiple of the batch: the enqueue wraps
        dim: 16,
        epochs: 2,
        bn_splits: 2,
        workers: 2,
        ..TrainConfig::default()
    }
}

fn snapshot(t: &Trainer<Cpu>) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, usize) {
    (
        t.encoder_q().params().clone(),
        t.encoder_k().params().clone(),
        t.encoder_q().running_stats().clone(),
        t.queue().to_host().unwrap(),
        t.queue().ptr(),
    )
}

#[test]
fn steps_train_and_move_the_key_encoder() {
    let mut t = Trainer::new(tiny(), Cpu::<f32>::new()).unwrap();
    let (q0, k0, _, queue0, _) = snapshot(&t);
    assert_eq!(
        q0, k0,
        "the key encoder starts as a copy of the query encoder"
    );
    let b = t.loader().batch(0, 0).unwrap();
    let s = t.step(&b).unwrap();
    assert!(s.loss.is_finite() && s.loss > 0.0);
    assert!((0.0..=1.0).contains(&s.accuracy));
    let (q1, k1, _, queue1, ptr) = snapshot(&t);
    assert_ne!(q0, q1, "SGD changed the query encoder");
    // The momentum update ran before the SGD step: k1 = m k0 + (1 - m) q0 = q0 (equal).
    assert_eq!(k1, k0);
    assert_ne!(queue0, queue1, "keys were enqueued");
    assert_eq!(ptr, 16);
    let s2 = t.step(&t.loader().batch(0, 1).unwrap()).unwrap();
    assert!(s2.loss.is_finite());
    assert_ne!(
        t.encoder_k().params(),
        &k1,
        "second step moves the key encoder toward f_q"
    );
}

#[test]
fn knn_monitor_is_a_fraction() {
    let mut t = Trainer::new(tiny(), Cpu::<f32>::new()).unwrap();
    let a = t.knn_top1().unwrap();
    assert!((0.0..=1.0).contains(&a));
}

#[test]
fn resume_is_bit_identical() {
    let stop = AtomicBool::new(false);
    // Uninterrupted: 2 epochs.
    let mut a = Trainer::new(tiny(), Cpu::<f32>::new()).unwrap();
    for _ in 0..2 {
        assert!(a.train_epoch(&stop, &mut |_| {}).unwrap());
        a.finish_epoch();
    }
    // Interrupted mid-epoch 1 (after 2 steps), checkpointed, resumed in a new trainer.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("resume");
    std::fs::create_dir_all(&dir).unwrap();
    let mut b = Trainer::new(tiny(), Cpu::<f32>::new()).unwrap();
    assert!(b.train_epoch(&stop, &mut |_| {}).unwrap());
    b.finish_epoch();
    let stop_now = AtomicBool::new(true);
    assert!(
        !b.train_epoch(&stop_now, &mut |_| {}).unwrap(),
        "stopped mid-epoch"
    );
    assert_eq!(b.step_in_epoch(), 1);
    b.save_checkpoint(&dir).unwrap();
    let sums_before = b.epoch_sums().clone();
    drop(b);
    let mut c = Trainer::resume(&dir, None, Cpu::<f32>::new()).unwrap();
    assert_eq!(c.epoch(), 1);
    assert_eq!(c.step_in_epoch(), 1);
    assert_eq!(c.epoch_sums(), &sums_before);
    assert!(c.train_epoch(&stop, &mut |_| {}).unwrap());
    c.finish_epoch();
    assert_eq!(
        snapshot(&a),
        snapshot(&c),
        "resumed run diverged from the uninterrupted one"
    );
}

#[test]
fn symmetric_loss_enqueues_both_key_sets() {
    let cfg = TrainConfig {
        symmetric: true,
        moco_k: 48,
        ..tiny()
    };
    let mut t = Trainer::new(cfg, Cpu::<f32>::new()).unwrap();
    let s = t.step(&t.loader().batch(0, 0).unwrap()).unwrap();
    assert!(s.loss.is_finite());
    assert_eq!(t.queue().ptr(), 32);
}

#[test]
fn bad_configs_are_errors() {
    let check = |c: TrainConfig, needle: &str| {
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(needle), "{e:?} should mention {needle:?}");
    };
    check(
        TrainConfig {
            moco_k: 8,
            ..tiny()
        },
        "--moco-k",
    );
    check(
        TrainConfig {
            moco_m: 1.5,
            ..tiny()
        },
        "--moco-m",
    );
    check(
        TrainConfig {
            moco_t: 0.0,
            ..tiny()
        },
        "--moco-t",
    );
    check(
        TrainConfig {
            bn_splits: 3,
            ..tiny()
        },
        "--bn-splits",
    );
    check(
        TrainConfig {
            epochs: 0,
            ..tiny()
        },
        "--epochs",
    );
    assert!(TrainConfig::preset("v3").is_err());
    // More images per batch than the data set has.
    let e = Trainer::new(
        TrainConfig {
            train_limit: 8,
            ..tiny()
        },
        Cpu::<f32>::new(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("fewer than one batch"), "{e}");
    // Named choices are typed: a wrong name is refused when the config is read, naming it.
    let dir = tempfile::tempdir().unwrap();
    for (key, value) in [
        ("arch", "vgg"),
        ("dataset", "imagenet21k"),
        ("augment", "v3"),
        ("schedule", "linear"),
        ("infonce", "fastest"),
        ("device", "tpu"),
        ("preset", "v9"),
        ("conv", "winograd"),
    ] {
        let p = dir.path().join(format!("{key}.toml"));
        std::fs::write(&p, format!("{key} = \"{value}\"\n")).unwrap();
        let e = TrainConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains(value), "{key}: {e:?} should mention {value:?}");
    }
    // And the names round-trip through config.json.
    let mut c = TrainConfig::preset("v1").unwrap();
    assert_eq!(
        c.conv,
        moco::backend::cuda::ConvBackend::Im2col,
        "im2col by default"
    );
    c.conv = "cudnn".parse().unwrap();
    c.save(dir.path()).unwrap();
    assert_eq!(
        TrainConfig::load(&dir.path().join("config.json")).unwrap(),
        c
    );
}

#[test]
fn config_files_round_trip_and_reject_unknown_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("config");
    std::fs::create_dir_all(&dir).unwrap();
    let c = TrainConfig::preset("cifar").unwrap();
    let p = c.save(&dir).unwrap();
    assert_eq!(TrainConfig::load(&p).unwrap(), c);
    let toml = dir.join("c.toml");
    std::fs::write(&toml, "preset = \"v2\"\nepochs = 3\nmoco_t = 0.3\n").unwrap();
    let t = TrainConfig::load(&toml).unwrap();
    assert_eq!((t.epochs, t.moco_t, t.mlp, t.moco_k), (3, 0.3, true, 65536));
    std::fs::write(&toml, "epochz = 3\n").unwrap();
    assert!(TrainConfig::load(&toml)
        .unwrap_err()
        .to_string()
        .contains("epochz"));
}

#[test]
fn nan_loss_stops_with_an_error_and_keeps_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nan");
    std::fs::create_dir_all(&dir).unwrap();
    let mut t = Trainer::new(TrainConfig { lr: 1e30, ..tiny() }, Cpu::<f32>::new()).unwrap();
    t.save_checkpoint(&dir).unwrap();
    let before = std::fs::read(dir.join(moco::train::CHECKPOINT_FILE)).unwrap();
    let stop = AtomicBool::new(false);
    let mut err = None;
    for _ in 0..3 {
        match t.train_epoch(&stop, &mut |_| {}) {
            Ok(_) => {
                t.finish_epoch();
            }
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let e = err.expect("a learning rate of 1e30 must diverge");
    assert!(matches!(e, moco::Error::Diverged(_)), "{e}");
    assert!(e.to_string().contains("--lr"), "{e}");
    let after = std::fs::read(dir.join(moco::train::CHECKPOINT_FILE)).unwrap();
    assert_eq!(before, after, "the last good checkpoint is untouched");
}
