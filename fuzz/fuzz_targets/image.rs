//! Image-folder decode path: `folder::decode_image` (JPEG/PNG signature, size bounds,
//! strict JPEG check and decode, resize and center crop) at a stored size picked by the
//! first byte (1..=64). `fuzz_nohook!`: a decoder panic that `decode_image` catches (and
//! turns into an error, see `folder::guard`) is not a failure; a panic that escapes still
//! aborts.
use std::path::Path;

fn main() {
    afl::fuzz_nohook!(|data: &[u8]| {
        let Some((&s, file)) = data.split_first() else {
            return;
        };
        let size = 1 + (s as usize % 64);
        if let Ok(img) = moco::data::folder::decode_image(file, Path::new("fuzz.img"), size) {
            assert_eq!(img.len(), 3 * size * size);
        }
    });
}
