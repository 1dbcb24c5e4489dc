//! CIFAR binary reader: the first byte picks CIFAR-10 or CIFAR-100 records and whether a
//! record count is expected; the rest is the file.
use std::path::Path;

fn main() {
    afl::fuzz!(|data: &[u8]| {
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
            assert_eq!(images.len(), labels.len() * 3072);
            moco::data::Dataset::new("fuzz", 3, 32, 32, images, labels, classes).unwrap();
        }
    });
}
