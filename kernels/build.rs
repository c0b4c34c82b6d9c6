//! Compiles the CUDA kernels to cubins with nvcc, only under the `cuda` feature (so CPU builds and
//! CI need no CUDA toolkit). Cubins for one architecture need no JIT on the GPU machine; set
//! `CUDA_COMPUTE_CAP` (default 90, the H200) and `NVCC` or `CUDA_ROOT` to choose the compiler.
use std::path::PathBuf;
use std::process::Command;

const MODULES: &[&str] = &["page_summaries", "plan", "prompt_attention", "selected_decode"];

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = std::env::var("NVCC").ok().unwrap_or_else(|| match std::env::var("CUDA_ROOT") {
        Ok(root) => format!("{root}/bin/nvcc"),
        Err(_) => "nvcc".to_string(),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    // nvcc takes minutes for the decode module: rebuild only cubins older than their sources, unless
    // the compiler or the architecture changed (recorded in a stamp beside the cubins).
    let stamp = out.join("cubins.stamp");
    let flags = format!("{nvcc} sm_{cap}");
    let same_flags = std::fs::read_to_string(&stamp).is_ok_and(|s| s == flags);
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let header = modified(std::path::Path::new("cuda/common.cuh"));
    for module in MODULES {
        let src = format!("cuda/{module}.cu");
        let dst = out.join(format!("{module}.cubin"));
        if let (true, Some(built), Some(source)) = (same_flags, modified(&dst), modified(std::path::Path::new(&src))) {
            if built > source && header.is_some_and(|h| built > h) {
                continue;
            }
        }
        let status = Command::new(&nvcc)
            .args(["-cubin", &format!("-arch=sm_{cap}"), "-O3", "-std=c++17", "-lineinfo", "-o"])
            .arg(&dst)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("retro-kernels: cannot run nvcc ({nvcc}): {e}; see docs/gpu.md, \"Building for the GPU\""));
        assert!(status.success(), "retro-kernels: nvcc failed on {src}");
    }
    std::fs::write(&stamp, flags).expect("write cubins.stamp");
}
