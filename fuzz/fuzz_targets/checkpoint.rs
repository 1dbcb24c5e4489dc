//! Checkpoint reader: the input is `checkpoint.safetensors` of a run directory, read with
//! `Trainer::read_checkpoint` (safetensors header, F32 tensors, the moco metadata JSON)
//! and, for any file, `checkpoint::read_tensors`. The readers take a path, so the input
//! goes to a file in a per-process temporary directory first.
use std::io::Write;

use moco::backend::Cpu;
use moco::train::{checkpoint, Trainer, CHECKPOINT_FILE};

fn main() {
    let dir = std::env::temp_dir().join(format!("moco-fuzz-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(CHECKPOINT_FILE);
    afl::fuzz!(|data: &[u8]| {
        std::fs::File::create(&path)
            .unwrap()
            .write_all(data)
            .unwrap();
        if let Ok((tensors, _meta)) = checkpoint::read_tensors(&path) {
            for t in &tensors {
                assert_eq!(
                    t.shape.iter().product::<usize>(),
                    t.data.len(),
                    "{}",
                    t.name
                );
            }
        }
        let _ = Trainer::<Cpu>::read_checkpoint(&dir);
    });
}
