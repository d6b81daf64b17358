// Bakes the libtorch library directory into every binary, test and example as an rpath, so
// `cargo run` and `cargo test` work without LD_LIBRARY_PATH.
fn main() {
    // torch-sys (links = "tch") exports its lib dir to dependents as DEP_TCH_LIBTORCH_LIB.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB; run scripts/setup/libtorch.sh");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // With a CUDA libtorch, keep libtorch_cuda.so linked even though no symbol of it is referenced
    // directly: it registers the CUDA backend when loaded (`--as-needed` would drop it).
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
