//! IDX reader (MNIST-style files, plain or gzipped): `idx::read_idx_stream` on the input,
//! then the data set the IDX loader would build from a 3-dimensional result.
use std::path::Path;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let path = Path::new("fuzz.idx");
        if let Ok((dims, pixels)) = moco::data::idx::read_idx_stream(path, data, data.len() as u64)
        {
            let count: usize = dims.iter().product();
            assert_eq!(count, pixels.len(), "dims {dims:?}");
            // As `idx::load`: an empty image size is refused, so `n <= pixels.len()`.
            if let [n, h, w] = dims[..] {
                if h == 0 || w == 0 {
                    return;
                }
                let labels = vec![0u32; n];
                let _ = moco::data::Dataset::new("fuzz", 1, h, w, pixels, labels, 10);
            }
        }
    });
}
