//! Foundation: the build embeds what it should, the ABI agrees with C, devices parse.

/// With MOCO_REQUIRE_KERNELS=1 (CI, gpu-check) the build must carry every kernel module.
#[test]
fn kernels_embedded_when_required() {
    let required = option_env!("MOCO_REQUIRE_KERNELS") == Some("1")
        || std::env::var("MOCO_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    if !required {
        eprintln!("MOCO_REQUIRE_KERNELS not set: embedded kernels not required");
        return;
    }
    assert!(moco::cuda::kernels_available(), "build has no kernels");
    let targets = moco::cuda::kernel_targets();
    for t in ["sm_80", "sm_90", "compute_90"] {
        assert!(
            targets.split(',').any(|x| x == t),
            "missing target {t} in {targets}"
        );
    }
    let mut cus: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels"))
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "cu").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    cus.sort();
    let mut have: Vec<String> = moco::cuda::kernel_modules()
        .iter()
        .map(|s| s.to_string())
        .collect();
    have.sort();
    assert_eq!(cus, have, "every kernels/*.cu must be embedded");
    for m in &have {
        let len = moco::cuda::kernel_image_len(m).unwrap();
        assert!(len > 1000, "module {m} image is only {len} bytes");
    }
}

/// The typed kernel constants `build.rs` reads from the sources name exactly the entry
/// points nvcc compiled: each constant's symbol is in its module's image, and each image
/// has no `moco_` entry point without a constant (every kernel has a `.text.<name>`
/// section).
#[test]
fn kernel_constants_match_the_compiled_entry_points() {
    use moco::cuda::kernels;
    let mut names: Vec<(&str, &str)> = kernels::ALL
        .iter()
        .map(|k| (k.module(), k.name()))
        .collect();
    let n = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), n, "a kernel constant is listed twice");
    assert!(names.contains(&("conv", "moco_im2col_f32")));
    assert!(names.contains(&("contrast", "moco_infonce_partial_c256")));
    if !moco::cuda::kernels_available() {
        return; // built without nvcc: the constants exist, the images do not
    }
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    for module in moco::cuda::kernel_modules() {
        let image = moco::cuda::kernel_image(module).unwrap();
        let ours: Vec<&str> = names
            .iter()
            .filter(|(m, _)| *m == module)
            .map(|(_, k)| *k)
            .collect();
        for k in &ours {
            let sym = format!("{k}\0");
            assert!(
                find(image, sym.as_bytes()),
                "{module}: no entry point {k} in the image"
            );
        }
        // Entry points in the image: `.text.moco_<name>\0` section names.
        let mut found: Vec<String> = Vec::new();
        let pat = b".text.moco_";
        for i in 0..image.len().saturating_sub(pat.len()) {
            if &image[i..i + pat.len()] == pat {
                let rest = &image[i + 6..];
                let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
                found.push(String::from_utf8_lossy(&rest[..end]).into_owned());
            }
        }
        found.sort();
        found.dedup();
        let mut want: Vec<String> = ours.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(
            found, want,
            "{module}: entry points in the image vs kernels::{module}"
        );
    }
}

#[test]
fn abi_layout_matches_c_compiler() {
    let c = moco::cuda::abi::c_layout();
    let r = moco::cuda::abi::rust_layout();
    assert!(!c.is_empty());
    assert_eq!(
        c, r,
        "Rust mirror of kernels/moco_abi.h disagrees with the C compiler"
    );
}

#[test]
fn device_parsing() {
    use moco::Device;
    assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!("CUDA".parse::<Device>().unwrap(), Device::Cuda(0));
    assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
    assert!("cuda:x".parse::<Device>().is_err());
    assert!("metal".parse::<Device>().is_err());
    assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
}

/// Without a usable GPU, asking for one is an error that says why, never a panic.
#[test]
fn gpu_request_without_gpu_is_an_error() {
    if moco::device::cuda_device_count() > 0 && moco::cuda::kernels_available() {
        return; // a real GPU: covered by the GPU tests
    }
    let err = moco::cuda::Gpu::new(0).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            moco::Error::NoKernels | moco::Error::NoDriver | moco::Error::NoGpu { .. }
        ),
        "unexpected error: {msg}"
    );
    assert!(
        msg.contains("--device cpu") || msg.contains("install"),
        "{msg}"
    );
}

#[test]
fn auto_device_is_cpu_without_gpu() {
    if moco::device::cuda_device_count() == 0 {
        assert_eq!(moco::Device::auto(), moco::Device::Cpu);
    }
}
