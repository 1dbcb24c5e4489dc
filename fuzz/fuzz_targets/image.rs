//! Image-folder decode path: `folder::decode_image` (JPEG/PNG signature, size bounds,
//! strict JPEG check and decode, resize and center crop) at a stored size picked by the
//! first byte (1..=64).
use std::path::Path;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&s, file)) = data.split_first() else {
            return;
        };
        let size = 1 + (s as usize % 64);
        if let Ok(img) = moco::data::folder::decode_image(file, Path::new("fuzz.img"), size) {
            assert_eq!(img.len(), 3 * size * size);
        }
    });
}
