//! Data-parallel training: the thread communicator's collectives, the distributed MoCo step
//! against the single-device step on the same global batch, and the TCP rendezvous.
use std::net::TcpListener;
use std::time::{Duration, Instant};

use moco::backend::{Cpu, Scalar};
use moco::dist::rendezvous::{rendezvous, DistEnv};
use moco::dist::{Communicator, ThreadComm};
use moco::model::InputShape;
use moco::train::{Moco, StepStats, TrainConfig, Trainer};
use moco::Error;

fn run_ranks<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(ThreadComm) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let group = ThreadComm::group(world, timeout).unwrap();
    let hs: Vec<_> = group
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || f(c))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn collectives_agree_on_every_rank() {
    let be = Cpu::<f32>::new();
    let out = run_ranks(3, Duration::from_secs(20), move |c| {
        let r = c.rank() as f32;
        let all = c.all_gather(&be, &vec![r, r + 0.5]).unwrap();
        let mut b = vec![r; 2];
        c.broadcast(&be, &mut b, 2).unwrap();
        let mut m = vec![r, 10.0 * r];
        c.all_reduce_mean(&be, &mut m).unwrap();
        let mut h = [r as f64 * 3.0];
        Communicator::<Cpu<f32>>::all_reduce_mean_host(&c, &mut h).unwrap();
        Communicator::<Cpu<f32>>::barrier(&c).unwrap();
        (all, b, m, h[0])
    });
    for (all, b, m, h) in out {
        assert_eq!(all, vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
        assert_eq!(b, vec![2.0, 2.0]);
        assert_eq!(m, vec![1.0, 10.0]);
        assert_eq!(h, 3.0);
    }
}

#[test]
fn a_rank_that_leaves_or_lags_fails_the_others_without_a_hang() {
    let be = Cpu::<f32>::new();
    // Rank 1 leaves at once (its handle dropped): rank 0's collective fails fast.
    let t0 = Instant::now();
    let out = run_ranks(2, Duration::from_secs(30), move |c| {
        if c.rank() == 1 {
            return None;
        }
        Some(c.all_gather(&be, &vec![1.0f32]).unwrap_err())
    });
    let e = out[0].as_ref().unwrap();
    assert!(
        matches!(e, Error::Comm(_)) && e.to_string().contains("rank 1 left"),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(20));

    // Rank 2 is alive but never arrives: the others time out, naming it.
    let group = ThreadComm::group(3, Duration::from_millis(300)).unwrap();
    let mut it = group.into_iter();
    let (a, b, lagging) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    let be2 = Cpu::<f32>::new();
    let h = std::thread::spawn(move || b.all_reduce_mean(&be2, &mut vec![1.0f32]));
    let ea = a.all_reduce_mean(&be, &mut vec![1.0f32]).unwrap_err();
    let eb = h.join().unwrap().unwrap_err();
    assert!(ea.to_string().contains("rank(s) 2 did not reach"), "{ea}");
    assert!(matches!(eb, Error::Comm(_)), "{eb}");
    // The group stays broken: the late rank is told, not left waiting.
    let el = lagging.all_reduce_mean(&be, &mut vec![1.0f32]).unwrap_err();
    assert!(matches!(el, Error::Comm(_)), "{el}");
}

#[test]
fn ranks_out_of_step_or_of_different_lengths_are_refused() {
    let be = Cpu::<f32>::new();
    let out = run_ranks(2, Duration::from_secs(20), move |c| {
        let r = c.rank();
        let len_err = c.all_gather(&be, &vec![0.0f32; 1 + r]).unwrap_err();
        len_err.to_string()
    });
    assert!(out.iter().all(|e| e.contains("brought")), "{out:?}");
    let be = Cpu::<f32>::new();
    let out = run_ranks(2, Duration::from_secs(20), move |c| {
        let mut v = vec![0.0f32; 2];
        if c.rank() == 0 {
            c.broadcast(&be, &mut v, 0).unwrap_err().to_string()
        } else {
            c.all_reduce_mean(&be, &mut v).unwrap_err().to_string()
        }
    });
    assert!(out.iter().all(|e| e.contains("out of step")), "{out:?}");
    assert!(ThreadComm::group(0, Duration::from_secs(1)).is_err());
}

fn cfg(symmetric: bool, world: usize) -> TrainConfig {
    TrainConfig {
        arch: moco::model::Arch::Resnet8,
        image_size: 8,
        batch_size: 8,
        moco_k: 28, // not a multiple of the global batch: the enqueue wraps mid-step
        dim: 8,
        bn_splits: world,
        symmetric,
        ..TrainConfig::default()
    }
}

/// Everything a MoCo state is, as f64, with the step statistics.
type Snapshot = (Vec<StepStats>, Vec<Vec<f64>>, usize);

fn snapshot<B: moco::backend::Backend>(m: &Moco<B>, stats: Vec<StepStats>) -> Snapshot {
    let be = m.backend();
    let bufs = vec![
        be.download_f64(m.encoder_q().params()).unwrap(),
        be.download_f64(m.encoder_q().running_stats()).unwrap(),
        be.download_f64(m.encoder_k().params()).unwrap(),
        be.download_f64(m.encoder_k().running_stats()).unwrap(),
        be.download_f64(m.optimizer().momentum_buffer()).unwrap(),
        m.queue().to_host_f64().unwrap(),
    ];
    (stats, bufs, m.queue().ptr())
}

const STEPS: usize = 5;

fn batch(step: usize, shape: InputShape) -> (Vec<f32>, Vec<f32>) {
    (
        moco::rng::uniform(shape.len(), 100 + step as u64),
        moco::rng::uniform(shape.len(), 200 + step as u64),
    )
}

fn single<S: Scalar>(c: &TrainConfig) -> Snapshot {
    let mut m = Moco::new(c, Cpu::<S>::new(), 1, 100).unwrap();
    let shape = InputShape::new(c.batch_size, 1, 8, 8);
    let stats = (0..STEPS)
        .map(|s| {
            let (q, k) = batch(s, shape);
            m.step(&q, &k, shape).unwrap()
        })
        .collect();
    snapshot(&m, stats)
}

fn distributed<S: Scalar>(c: &TrainConfig, world: usize) -> Vec<Snapshot> {
    let c = c.clone();
    run_ranks(world, Duration::from_secs(120), move |comm| {
        let rank = comm.rank();
        let mut m = Moco::new(&c, Cpu::<S>::new(), 1, 100).unwrap();
        if rank > 0 {
            // A different start on the other ranks: the sync must replace all of it.
            let mut other = c.clone();
            other.seed = 77;
            m = Moco::new(&other, Cpu::<S>::new(), 1, 100).unwrap();
        }
        m.sync_from_rank0(&comm).unwrap();
        let global = InputShape::new(c.batch_size, 1, 8, 8);
        let n = c.batch_size / world;
        let local = InputShape::new(n, 1, 8, 8);
        let img = 64;
        let stats = (0..STEPS)
            .map(|s| {
                let (q, k) = batch(s, global);
                // Rank r holds global images r, r + world, ... (DistributedSampler's deal).
                let mine = |x: &[f32]| -> Vec<f32> {
                    (0..n)
                        .flat_map(|j| {
                            let g = j * world + rank;
                            x[g * img..(g + 1) * img].to_vec()
                        })
                        .collect()
                };
                m.step_distributed(&comm, &mine(&q), &mine(&k), local)
                    .unwrap()
            })
            .collect();
        snapshot(&m, stats)
    })
}

fn assert_close(a: &Snapshot, b: &Snapshot, tol: f64, what: &str) {
    assert_eq!(a.2, b.2, "{what}: queue pointer");
    for (s, t) in a.0.iter().zip(&b.0) {
        assert!(
            (s.loss - t.loss).abs() <= tol * s.loss.abs().max(1.0),
            "{what}: loss {s:?} vs {t:?}"
        );
        assert!(
            (s.accuracy - t.accuracy).abs() <= 1e-12,
            "{what}: accuracy {s:?} vs {t:?}"
        );
        assert_eq!(s.images, t.images, "{what}: images");
    }
    let names = [
        "q.params",
        "q.running",
        "k.params",
        "k.running",
        "momentum",
        "queue",
    ];
    for ((x, y), name) in a.1.iter().zip(&b.1).zip(names) {
        assert_eq!(x.len(), y.len(), "{what}: {name} length");
        let scale = x.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let worst = x
            .iter()
            .zip(y)
            .map(|(u, v)| (u - v).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= tol * scale,
            "{what}: {name} differs by {worst:e} (scale {scale})"
        );
    }
}

#[test]
fn distributed_step_equals_single_device_step_f64() {
    for symmetric in [false, true] {
        for world in [2, 4] {
            let c = cfg(symmetric, world);
            let one = single::<f64>(&c);
            let ranks = distributed::<f64>(&c, world);
            for (r, snap) in ranks.iter().enumerate() {
                let what = format!("world {world} rank {r} symmetric {symmetric}");
                assert_close(&one, snap, 1e-12, &what);
                // Every rank holds the same state, bit for bit.
                assert_eq!(snap.1, ranks[0].1, "{what}: ranks disagree");
            }
        }
    }
}

#[test]
fn distributed_step_equals_single_device_step_f32() {
    let c = cfg(false, 2);
    let one = single::<f32>(&c);
    let ranks = distributed::<f32>(&c, 2);
    for snap in &ranks {
        assert_close(&one, snap, 2e-5, "f32 world 2");
    }
    // And it is not trivially so: a different global permutation changes the result.
    let mut c2 = c.clone();
    c2.seed = 5;
    let other = single::<f32>(&c2);
    let differs = one.1[2]
        .iter()
        .zip(&other.1[2])
        .any(|(a, b)| (a - b).abs() > 1e-3);
    assert!(differs);
}

#[test]
fn distributed_step_refuses_bad_shapes_on_every_rank() {
    let c = cfg(false, 4);
    let out = run_ranks(2, Duration::from_secs(20), move |comm| {
        let mut m = Moco::new(&c, Cpu::<f32>::new(), 1, 100).unwrap();
        let s = InputShape::new(3, 1, 8, 8); // 3 images do not split into 4 / 2 groups
        let x = vec![0.0f32; s.len()];
        m.step_distributed(&comm, &x, &x, s)
            .unwrap_err()
            .to_string()
    });
    assert!(
        out.iter().all(|e| e.contains("BatchNorm groups")),
        "{out:?}"
    );
    let c = TrainConfig {
        batch_size: 12,
        ..cfg(false, 3)
    };
    let out = run_ranks(2, Duration::from_secs(20), move |comm| {
        let mut m = Moco::new(&c, Cpu::<f32>::new(), 1, 100).unwrap();
        let s = InputShape::new(4, 1, 8, 8);
        let x = vec![0.0f32; s.len()];
        m.step_distributed(&comm, &x, &x, s)
            .unwrap_err()
            .to_string()
    });
    assert!(
        out.iter().all(|e| e.contains("multiple of the world size")),
        "{out:?}"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn env(rank: usize, world: usize, port: u16) -> DistEnv {
    DistEnv::from_vars(|k| match k {
        "RANK" => Some(rank.to_string()),
        "WORLD_SIZE" => Some(world.to_string()),
        "MASTER_ADDR" => Some("127.0.0.1".into()),
        "MASTER_PORT" => Some(port.to_string()),
        _ => None,
    })
    .unwrap()
}

#[test]
fn rendezvous_ranks_join_in_any_order() {
    let port = free_port();
    let world = 4;
    // Rank 0 starts last, after the others have been retrying for a while.
    let order = [3usize, 1, 2, 0];
    let hs: Vec<_> = order
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(60 * i as u64));
                let got = rendezvous(
                    &env(r, world, port),
                    || Ok(b"the-unique-id".to_vec()),
                    Duration::from_secs(30),
                );
                (r, got)
            })
        })
        .collect();
    for h in hs {
        let (r, got) = h.join().unwrap();
        assert_eq!(got.unwrap(), b"the-unique-id", "rank {r}");
    }
}

#[test]
fn rendezvous_missing_rank_times_out_clearly_on_every_rank() {
    let port = free_port();
    let t0 = Instant::now();
    let hs: Vec<_> = [0usize, 1]
        .into_iter()
        .map(|r| {
            std::thread::spawn(move || {
                rendezvous(
                    &env(r, 3, port),
                    || Ok(vec![1]),
                    Duration::from_millis(3000),
                )
            })
        })
        .collect();
    let errs: Vec<String> = hs
        .into_iter()
        .map(|h| h.join().unwrap().unwrap_err().to_string())
        .collect();
    assert!(errs[0].contains("rank(s) 2 did not join"), "{}", errs[0]);
    // Rank 1 is told by rank 0 ("rank 0 ended the rendezvous: ..."), or, on a loaded
    // machine where rank 0 gave up before accepting it, notices rank 0 has gone.
    assert!(
        errs[1].contains("rank 0 ended the rendezvous") || errs[1].contains("no answer"),
        "{}",
        errs[1]
    );
    assert!(t0.elapsed() < Duration::from_secs(15));
    // Rank 0 never comes: a joining rank gives up within its timeout.
    let e = rendezvous(
        &env(1, 2, free_port()),
        || Ok(vec![]),
        Duration::from_millis(300),
    )
    .unwrap_err();
    assert!(e.to_string().contains("could not reach rank 0"), "{e}");
}

#[test]
fn rendezvous_ignores_strangers_and_refuses_bad_environments() {
    use std::io::Write;
    let port = free_port();
    let server = std::thread::spawn(move || {
        rendezvous(&env(0, 2, port), || Ok(vec![7, 7]), Duration::from_secs(20))
    });
    // A stranger connects first and writes garbage; then a rank with the wrong world.
    let connect = || loop {
        if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stranger = connect();
    stranger.write_all(&[0xAB; 24]).unwrap();
    let wrong = rendezvous(&env(1, 3, port), || Ok(vec![]), Duration::from_secs(5));
    assert!(wrong.unwrap_err().to_string().contains("WORLD_SIZE=3"));
    let good = rendezvous(&env(1, 2, port), || Ok(vec![]), Duration::from_secs(20)).unwrap();
    assert_eq!(good, vec![7, 7]);
    assert_eq!(server.join().unwrap().unwrap(), vec![7, 7]);

    let get = |pairs: &'static [(&'static str, &'static str)]| {
        DistEnv::from_vars(move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    };
    for (pairs, msg) in [
        (&[("RANK", "0")][..], "WORLD_SIZE is not set"),
        (&[("WORLD_SIZE", "2")][..], "RANK is not set"),
        (&[("WORLD_SIZE", "2"), ("RANK", "2")][..], "not in a world"),
        (&[("WORLD_SIZE", "0"), ("RANK", "0")][..], "not in a world"),
        (&[("WORLD_SIZE", "-1"), ("RANK", "0")][..], "whole number"),
        (
            &[("WORLD_SIZE", "99999999999999999999"), ("RANK", "0")][..],
            "whole number",
        ),
        (&[("WORLD_SIZE", "2"), ("RANK", "x")][..], "whole number"),
        (
            &[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "70000")][..],
            "MASTER_PORT",
        ),
        (
            &[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "0")][..],
            "MASTER_PORT",
        ),
        (
            &[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", " ")][..],
            "MASTER_ADDR",
        ),
    ] {
        let e = get(pairs).unwrap_err().to_string();
        assert!(e.contains(msg), "{pairs:?}: {e}");
    }
    let ok = get(&[("WORLD_SIZE", "4"), ("RANK", "3"), ("LOCAL_RANK", "1")]).unwrap();
    assert_eq!(
        (ok.rank, ok.world, ok.local_rank, ok.master_port),
        (3, 4, 1, 29500)
    );
}

fn tiny_run(bn_splits: usize) -> TrainConfig {
    TrainConfig {
        arch: moco::model::Arch::Resnet8,
        image_size: 16,
        train_limit: 96,
        test_limit: 40, // not a multiple of the feature pass's 256 nor of the ranks
        batch_size: 16,
        moco_k: 40,
        dim: 16,
        epochs: 1,
        bn_splits,
        workers: 1,
        ..TrainConfig::default()
    }
}

type RunResult = (Vec<f32>, Vec<f32>, Vec<f32>, f64, f64);

fn train_one_epoch<B: moco::backend::Backend>(t: &mut Trainer<B>) -> RunResult {
    let stop = std::sync::atomic::AtomicBool::new(false);
    assert!(t.train_epoch(&stop, &mut |_| {}).unwrap());
    let sums = t.finish_epoch();
    let knn = t.knn_top1().unwrap();
    let be = t.moco().backend().clone();
    (
        be.download_f32(t.encoder_q().params()).unwrap(),
        be.download_f32(t.encoder_k().running_stats()).unwrap(),
        t.queue().to_host().unwrap(),
        sums.loss / sums.steps as f64,
        knn,
    )
}

#[test]
fn distributed_trainer_equals_single_process_trainer() {
    let c = tiny_run(2);
    let mut one = Trainer::new(c.clone(), Cpu::<f32>::new()).unwrap();
    let want = train_one_epoch(&mut one);
    let got = run_ranks(2, Duration::from_secs(120), move |comm| {
        let t = Trainer::new(c.clone(), Cpu::<f32>::new()).unwrap();
        let mut t = t.with_comm(Box::new(comm)).unwrap();
        assert_eq!(t.loader().batch(0, 0).unwrap().n, 8);
        train_one_epoch(&mut t)
    });
    for (r, g) in got.iter().enumerate() {
        let close = |a: &[f32], b: &[f32], what: &str| {
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "rank {r}: {what} differs by {worst}");
        };
        close(&want.0, &g.0, "encoder_q");
        close(&want.1, &g.1, "encoder_k running stats");
        close(&want.2, &g.2, "queue");
        assert!(
            (want.3 - g.3).abs() < 1e-4,
            "rank {r}: loss {} vs {}",
            want.3,
            g.3
        );
        assert_eq!(want.4, g.4, "rank {r}: kNN");
    }
}

#[test]
fn distributed_trainer_refuses_what_does_not_split() {
    let c = tiny_run(2);
    let out = run_ranks(4, Duration::from_secs(20), move |comm| {
        let t = Trainer::new(c.clone(), Cpu::<f32>::new()).unwrap();
        t.with_comm(Box::new(comm)).err().map(|e| e.to_string())
    });
    assert!(
        out.iter()
            .all(|e| e.as_deref().is_some_and(|e| e.contains("bn-splits"))),
        "{out:?}"
    );
}

// ---- On a GPU (NCCL) ----

fn gpu_cfg(bn_splits: usize) -> TrainConfig {
    TrainConfig {
        arch: moco::model::Arch::Resnet8,
        image_size: 16,
        batch_size: 16,
        moco_k: 40,
        dim: 16,
        bn_splits,
        ..TrainConfig::default()
    }
}

fn gpu_steps(
    m: &mut Moco<moco::backend::Cuda>,
    comm: Option<(&dyn Communicator<moco::backend::Cuda>, usize, usize)>,
) -> Snapshot {
    let global = InputShape::new(16, 3, 16, 16);
    let img = 3 * 16 * 16;
    let stats = (0..4)
        .map(|s| {
            let (q, k) = batch(s, global);
            match comm {
                None => m.step(&q, &k, global).unwrap(),
                Some((c, rank, world)) => {
                    let n = 16 / world;
                    let mine = |x: &[f32]| -> Vec<f32> {
                        (0..n)
                            .flat_map(|j| {
                                let g = j * world + rank;
                                x[g * img..(g + 1) * img].to_vec()
                            })
                            .collect()
                    };
                    let local = InputShape::new(n, 3, 16, 16);
                    m.step_distributed(c, &mine(&q), &mine(&k), local).unwrap()
                }
            }
        })
        .collect();
    snapshot(m, stats)
}

/// Runs an NCCL test body: `NCCL_DEBUG=WARN` (unless set), bounded by
/// [`moco::testing::NCCL_TEST_TIMEOUT`]; when NCCL fails to initialize (`ncclCommInitRank`,
/// `ncclGetUniqueId`), the test runs once more in a fresh process of this binary with
/// `NCCL_CUMEM_ENABLE=0` (cuMem allocations fail in some sandboxes; NCCL reads its
/// environment once per process, so the retry cannot be in this one).
fn nccl_test(name: &str, body: impl FnOnce() + Send + 'static) {
    if std::env::var_os("NCCL_DEBUG").is_none() {
        std::env::set_var("NCCL_DEBUG", "WARN");
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        moco::testing::run_with_timeout(name, moco::testing::NCCL_TEST_TIMEOUT, body)
    }));
    let Err(p) = r else { return };
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    let init = msg.contains("ncclCommInitRank") || msg.contains("ncclGetUniqueId");
    if !init || std::env::var_os("NCCL_CUMEM_ENABLE").is_some() {
        std::panic::resume_unwind(p);
    }
    eprintln!("{name}: NCCL init failed ({msg}); once more with NCCL_CUMEM_ENABLE=0");
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args([
            name,
            "--exact",
            "--include-ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("NCCL_CUMEM_ENABLE", "0")
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > moco::testing::NCCL_TEST_TIMEOUT + Duration::from_secs(10) {
            let _ = child.kill();
            panic!("{name}: the NCCL_CUMEM_ENABLE=0 retry timed out");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "{name} failed, also with NCCL_CUMEM_ENABLE=0 (first: {msg})"
    );
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL"]
fn nccl_world_of_one_gives_the_single_gpu_numbers_exactly() {
    nccl_test(
        "nccl_world_of_one_gives_the_single_gpu_numbers_exactly",
        nccl_world_of_one,
    );
}

fn nccl_world_of_one() {
    use moco::backend::Cuda;
    use moco::dist::rendezvous::DistEnv;
    use moco::dist::NcclComm;
    let c = gpu_cfg(2);
    let be = Cuda::new(moco::testing::test_gpu()).unwrap();
    let mut one = Moco::new(&c, be.clone(), 3, 100).unwrap();
    let want = gpu_steps(&mut one, None);
    eprintln!("NCCL {:?}", moco::dist::nccl::nccl_version());
    let comm = NcclComm::new(&be, &DistEnv::single(), Duration::from_secs(60)).unwrap();
    let mut m = Moco::new(&c, be.clone(), 3, 100).unwrap();
    m.sync_from_rank0(&comm).unwrap();
    let got = gpu_steps(&mut m, Some((&comm, 0, 1)));
    assert_eq!(want.1, got.1, "state");
    assert_eq!(want.2, got.2, "queue pointer");
    assert_eq!(
        want.0.iter().map(|s| s.loss).collect::<Vec<_>>(),
        got.0.iter().map(|s| s.loss).collect::<Vec<_>>()
    );
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL >= 2.30 (two ranks on one GPU)"]
fn nccl_two_ranks_on_one_gpu_equal_one_rank_with_two_splits() {
    nccl_test(
        "nccl_two_ranks_on_one_gpu_equal_one_rank_with_two_splits",
        nccl_two_ranks,
    );
}

fn nccl_two_ranks() {
    use moco::backend::Cuda;
    use moco::dist::NcclComm;
    let version = moco::dist::nccl::nccl_version();
    eprintln!("NCCL {version:?}");
    if version.is_none_or(|v| v < (2, 30, 0)) {
        eprintln!(
            "NCCL {version:?} is older than 2.30: several ranks per GPU are not possible here"
        );
        return;
    }
    // Set before any NCCL communicator of this process exists.
    std::env::set_var("NCCL_MULTI_RANK_GPU_ENABLE", "1");
    let c = gpu_cfg(2);
    let be = Cuda::new(moco::testing::test_gpu()).unwrap();
    let mut one = Moco::new(&c, be, 3, 100).unwrap();
    let want = gpu_steps(&mut one, None);
    let port = free_port();
    let hs: Vec<_> = (0..2)
        .map(|rank| {
            let c = c.clone();
            std::thread::spawn(move || {
                let be = Cuda::new(moco::testing::test_gpu()).unwrap();
                let comm =
                    NcclComm::new(&be, &env(rank, 2, port), Duration::from_secs(60)).unwrap();
                let mut m = Moco::new(&c, be, 3, 100).unwrap();
                m.sync_from_rank0(&comm).unwrap();
                gpu_steps(&mut m, Some((&comm, rank, 2)))
            })
        })
        .collect();
    for h in hs {
        let got = h.join().unwrap();
        assert_close(&want, &got, 2e-5, "NCCL 2 ranks");
    }
}
