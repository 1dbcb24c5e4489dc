//! Config reader: `TrainConfig::load` on the input as a `.toml` (first byte even) or a
//! `.json` file (odd). The loader reads from a path, so the input goes to a file in a
//! per-process temporary directory first.
use std::io::Write;

fn main() {
    let dir = std::env::temp_dir().join(format!("moco-fuzz-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml = dir.join("c.toml");
    let json = dir.join("c.json");
    afl::fuzz!(|data: &[u8]| {
        let Some((&mode, text)) = data.split_first() else {
            return;
        };
        let path = if mode & 1 == 0 { &toml } else { &json };
        std::fs::File::create(path)
            .unwrap()
            .write_all(text)
            .unwrap();
        if let Ok(cfg) = moco::train::TrainConfig::load(path) {
            // What loads must validate and survive the config.json round trip.
            cfg.validate().unwrap();
            let back = cfg.save(&dir).unwrap();
            let again = moco::train::TrainConfig::load(&back).unwrap();
            assert_eq!(format!("{cfg:?}"), format!("{again:?}"));
        }
    });
}
