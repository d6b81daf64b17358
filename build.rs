// Bakes the libtorch library directory into every binary, test and example as an rpath, so
// `cargo run` and `cargo test` work without LD_LIBRARY_PATH; compiles the C++ parts against the
// same libtorch: the host memory allocator (src/host_memory.cpp), the 4-bit kernels
// (src/model/quant_kernels.cpp) and the data-parallel shim (src/dist/shim.cpp).
use std::path::{Path, PathBuf};

fn main() {
    // torch-sys (links = "tch") exports its lib dir to dependents as DEP_TCH_LIBTORCH_LIB.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB; run scripts/setup/libtorch.sh");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // With a CUDA libtorch, keep libtorch_cuda.so linked even though no symbol of it is referenced
    // directly: it registers the CUDA backend when loaded (`--as-needed` would drop it).
    let cuda = Path::new(&lib).join("libtorch_cuda.so").exists();
    if cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    build_host_memory(Path::new(&lib));
    build_quant_kernels(Path::new(&lib));
    build_dist_shim(Path::new(&lib), cuda);
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// A C++17 build against libtorch's headers, as libtorch itself was compiled.
fn libtorch_cpp(lib: &Path) -> cc::Build {
    let include = lib.parent().expect("libtorch lib dir has a parent").join("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .warnings(false)
        .extra_warnings(false);
    build
}

/// The caching allocator of large CPU tensors (see src/host_memory.rs).
fn build_host_memory(lib: &Path) {
    println!("cargo:rerun-if-changed=src/host_memory.cpp");
    libtorch_cpp(lib).file("src/host_memory.cpp").compile("lorafit_host_memory");
}

/// Compiles the 4-bit dequantization kernel and linear layer. OpenMP as libtorch's own
/// (`at::parallel_for` is inline and uses it; libgomp.so.1 is the one libtorch loads). No
/// floating-point contraction: the kernel must round as libtorch's separate multiply and add do.
fn build_quant_kernels(lib: &Path) {
    println!("cargo:rerun-if-changed=src/model/quant_kernels.cpp");
    libtorch_cpp(lib)
        .file("src/model/quant_kernels.cpp")
        .flag("-fopenmp")
        .flag("-ffp-contract=off")
        .opt_level(3)
        .compile("lorafit_quant");
    println!("cargo:rustc-link-lib=dylib=gomp");
}

/// Compiles the c10d shim when gloo's headers are there (scripts/setup/gloo.sh installs them);
/// without them lorafit builds with `dist` reporting that it is missing (cfg `lorafit_dist`).
fn build_dist_shim(lib: &Path, cuda: bool) {
    println!("cargo:rustc-check-cfg=cfg(lorafit_dist)");
    println!("cargo:rerun-if-changed=src/dist/shim.cpp");
    println!("cargo:rerun-if-env-changed=LORAFIT_GLOO_INCLUDE");
    println!("cargo:rerun-if-env-changed=LORAFIT_NCCL_INCLUDE");
    let gloo = std::env::var_os("LORAFIT_GLOO_INCLUDE")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/usr/include")])
        .find(|dir| dir.join("gloo/algorithm.h").exists());
    let Some(gloo) = gloo else {
        println!(
            "cargo:warning=gloo headers not found: lorafit is built without data-parallel training; \
             run scripts/setup/gloo.sh (or set LORAFIT_GLOO_INCLUDE) and rebuild"
        );
        return;
    };
    println!("cargo:rerun-if-changed={}", gloo.join("gloo").display());
    let mut build = libtorch_cpp(lib);
    build.file("src/dist/shim.cpp").define("USE_C10D_GLOO", None).include(&gloo);
    // NCCL only when the libtorch has CUDA and NCCL's and CUDA's headers are found.
    if let Some(dirs) = cuda.then(|| nccl_includes(lib)).flatten() {
        build.define("LORAFIT_NCCL", None).define("USE_C10D_NCCL", None).define("USE_CUDA", None);
        for dir in dirs {
            build.include(dir);
        }
    }
    build.compile("lorafit_dist");
    println!("cargo:rustc-cfg=lorafit_dist");
}

/// The include directories NCCL's process group needs beside libtorch's: nccl.h, the CUDA
/// runtime's (with `crt/host_config.h` and `nv/target`), and cuBLAS's, cuSPARSE's and cuSOLVER's,
/// which ATen's CUDA context includes; from LORAFIT_NCCL_INCLUDE (colon-separated;
/// scripts/gpu/build_cuda.sh sets it) or the `nvidia/*/include` directories of the Python
/// environment the CUDA libtorch came from.
fn nccl_includes(lib: &Path) -> Option<Vec<PathBuf>> {
    let dirs: Vec<PathBuf> = match std::env::var_os("LORAFIT_NCCL_INCLUDE") {
        Some(list) => std::env::split_paths(&list).collect(),
        None => {
            let nvidia = lib.parent()?.parent()?.join("nvidia");
            let mut found = Vec::new();
            for entry in std::fs::read_dir(&nvidia).ok()?.flatten() {
                found.extend([entry.path().join("include"), entry.path().join("cu13/include")]);
            }
            found.into_iter().filter(|d| d.is_dir()).collect()
        }
    };
    let has = |file: &str| dirs.iter().any(|d| d.join(file).exists());
    let needed = ["nccl.h", "crt/host_config.h", "nv/target", "cublas_v2.h", "cusparse.h", "cusolverDn.h"];
    if needed.iter().all(|file| has(file)) {
        return Some(dirs);
    }
    println!("cargo:warning=CUDA libtorch without NCCL/CUDA headers: NCCL not compiled in (set LORAFIT_NCCL_INCLUDE)");
    None
}
