//! `lorafit::export::gguf` writes the llama.cpp LoRA file llama.cpp's own converter
//! (`convert_lora_to_gguf.py`, fetched by scripts/interop/fetch_llama_cpp_converter.sh) writes for
//! the same PEFT adapter: same metadata, tensor names, order, shapes, types and values, read back
//! with llama.cpp's `gguf` reader. GPT-2 is the one place lorafit differs on purpose (see
//! `src/export/gguf.rs`). rsLoRA and per-module alpha/rank, which the converter ignores, are
//! checked against PEFT's own scales instead. Last, the whole journey: the default model's
//! adapter, exported, answers in llama.cpp itself exactly as in lorafit.

mod common;

use lorafit::export::gguf::{export, GgufDtype};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Reads two GGUF files with gguf-py and asserts they hold the same adapter.
/// argv: converter's file, lorafit's file, `same` or `transposed` (GPT-2: lorafit's A is the
/// converter's B transposed and vice versa).
const COMPARE_PY: &str = r#"
import sys
import numpy as np
import gguf
from gguf.quants import dequantize

# Keys the converter derives from the adapter directory's name or its model card (README.md):
# descriptive only, never read by llama.cpp's adapter loader, and not reproduced by lorafit.
IGNORED = (
    "general.basename", "general.finetune", "general.version", "general.size_label",
    "general.base_model.", "general.license", "general.tags", "general.languages",
    "general.datasets", "general.dataset.", "general.organization", "general.author",
    "general.description", "general.url", "general.doi", "general.uuid", "general.repo_url",
    "general.source.", "general.quantized_by", "general.sampling.",
)

def read(path):
    r = gguf.GGUFReader(path)
    kv = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        value = f.contents()
        kv[k] = ([t.name for t in f.types], value)
    tensors = []
    for t in r.tensors:
        ne = [int(d) for d in t.shape]
        values = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(list(reversed(ne)))
        tensors.append((t.name, t.tensor_type.name, ne, values))
    return int(r.fields["GGUF.version"].contents()), kv, tensors

ref_path, ours_path, layout = sys.argv[1:4]
ref_version, ref_kv, ref_tensors = read(ref_path)
version, kv, tensors = read(ours_path)
errors = []
if version != ref_version:
    errors.append(f"GGUF version {version}, converter {ref_version}")
ignored = sorted(k for k in ref_kv if k.startswith(IGNORED))
ref_kv = {k: v for k, v in ref_kv.items() if not k.startswith(IGNORED)}
if list(kv) != list(ref_kv):
    errors.append(f"metadata keys {list(kv)}, converter {list(ref_kv)}")
for k, v in ref_kv.items():
    if k in kv and kv[k] != v:
        errors.append(f"metadata {k} = {kv[k]}, converter {v}")
if [t[0] for t in tensors] != [t[0] for t in ref_tensors]:
    errors.append(f"tensor names {[t[0] for t in tensors]}, converter {[t[0] for t in ref_tensors]}")
ref_by_name = {t[0]: t for t in ref_tensors}
for name, ty, ne, values in tensors:
    if name not in ref_by_name:
        continue
    if layout == "transposed":
        other = name[:-1] + ("b" if name.endswith("a") else "a")
        _, ref_ty, ref_ne, ref_values = ref_by_name[other]
        ref_ne, ref_values = list(reversed(ref_ne)), ref_values.T
    else:
        _, ref_ty, ref_ne, ref_values = ref_by_name[name]
    if ty != ref_ty:
        errors.append(f"{name}: type {ty}, converter {ref_ty}")
    if ne != ref_ne:
        errors.append(f"{name}: ne {ne}, converter {ref_ne}")
    elif not np.array_equal(values, ref_values):
        diff = float(np.abs(values - ref_values).max())
        errors.append(f"{name}: values differ (max |diff| {diff})")
print(f"{len(tensors)} tensors, {len(kv)} keys compared; ignored converter keys: {ignored}")
if errors:
    print("\n".join(errors[:20]))
    sys.exit(1)
"#;

/// Writes a variant of a Llama adapter that uses rsLoRA, a rank pattern (v_proj at rank 2, its
/// tensors cut to that rank) and alpha patterns. argv: source adapter dir, destination dir.
const VARIANT_PY: &str = r#"
import json, sys, os
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:3]
os.makedirs(dst, exist_ok=True)
tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
out = {}
for k, t in tensors.items():
    if ".v_proj.lora_A" in k:
        t = t[:2].contiguous()
    elif ".v_proj.lora_B" in k:
        t = t[:, :2].contiguous()
    out[k] = t
save_file(out, os.path.join(dst, "adapter_model.safetensors"), metadata={"format": "pt"})
cfg = json.load(open(os.path.join(src, "adapter_config.json")))
cfg.update({
    "use_rslora": True, "r": 4, "lora_alpha": 8,
    "rank_pattern": {"v_proj": 2},
    "alpha_pattern": {"q_proj": 16, "layers.1.mlp.down_proj": 3},
})
json.dump(cfg, open(os.path.join(dst, "adapter_config.json"), "w"), indent=2)
"#;

/// Loads the adapter with PEFT and checks that llama.cpp's `B·A·alpha/rank` from the GGUF file
/// equals PEFT's `B·A·scaling` for every adapted layer (q/k rows in llama.cpp's order).
/// argv: model dir, adapter dir, GGUF file, `equal` (or `differs`: some layer must not match,
/// which is what the converter's file gives).
const EFFECTIVE_PY: &str = r#"
import sys
import numpy as np
import torch
import gguf
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM
from peft import PeftModel

model_dir, adapter_dir, gguf_path, expect = sys.argv[1:5]
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model = PeftModel.from_pretrained(base, adapter_dir)
cfg = base.config
names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}

def permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

r = gguf.GGUFReader(gguf_path)
alpha = float(r.fields["adapter.lora.alpha"].contents())
ts = {t.name: dequantize(t.data, t.tensor_type).astype(np.float64).reshape(list(reversed([int(d) for d in t.shape])))
      for t in r.tensors}
checked, scales, wrong = 0, set(), []
for path, m in model.named_modules():
    if not hasattr(m, "lora_A") or "default" not in m.lora_A:
        continue
    path = path.removeprefix("base_model.model.")
    parts = path.split(".")
    layer, leaf = int(parts[2]), parts[-1]
    a = m.lora_A["default"].weight.detach().double().numpy()
    b = m.lora_B["default"].weight.detach().double().numpy()
    scaling = m.scaling["default"]
    scales.add(round(scaling, 6))
    want = b @ a * scaling
    if leaf == "q_proj":
        want = permute(want, cfg.num_attention_heads)
    elif leaf == "k_proj":
        want = permute(want, cfg.num_key_value_heads)
    name = f"blk.{layer}.{names[leaf]}.weight"
    ga, gb = ts[name + ".lora_a"], ts[name + ".lora_b"]
    got = gb @ ga * alpha / ga.shape[0]
    if not np.allclose(got, want, rtol=1e-5, atol=1e-7):
        wrong.append(f"{name}: max |diff| {float(np.abs(got - want).max())}, PEFT scaling {scaling}")
    checked += 1
assert checked * 2 == len(ts), f"{checked} PEFT modules for {len(ts)} GGUF tensors"
assert len(scales) >= 3, f"the variant should exercise several scales, got {scales}"
if expect == "equal":
    assert not wrong, "\n".join(wrong)
    print(f"{checked} modules: B·A·alpha/rank equals PEFT's B·A·scaling (scales {sorted(scales)})")
else:
    assert wrong, "every module matches PEFT"
    print(f"{len(wrong)} of {checked} modules differ from PEFT, e.g. {wrong[0]}")
"#;

/// GPT-2: llama.cpp's loader checks each adapter pair against the base tensor
/// (`model.ne[0] == a.ne[0]`, `model.ne[1] == b.ne[1]`, `a.ne[1] == b.ne[0]`). The base converter
/// stores GPT-2's `Conv1D` weights (`[in, out]` in the checkpoint) with ggml `ne = [in, out]`.
/// argv: model dir, lorafit's file, converter's file. lorafit's must pass; the converter's fails.
const GPT2_LOADER_PY: &str = r#"
import sys, os
import gguf
from safetensors import safe_open
model_dir, ours, reference = sys.argv[1:4]
hf = {"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
    keys = list(f.keys())
    def base_ne(name):
        _, layer, kind = name.split(".")[:3]
        key = next(k for k in keys if k.endswith(f"h.{layer}.{hf[kind]}.weight"))
        return list(f.get_slice(key).get_shape())  # [in, out] = ggml ne after the base conversion
    def problems(path):
        ts = {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(path).tensors}
        out = []
        for name, a in ts.items():
            if not name.endswith(".lora_a"):
                continue
            b, w = ts[name[:-1] + "b"], base_ne(name)
            if not (w[0] == a[0] and w[1] == b[1] and a[1] == b[0]):
                out.append(f"{name}: base ne {w}, a.ne {a}, b.ne {b}")
        return out
    ours_problems, reference_problems = problems(ours), problems(reference)
assert not ours_problems, ours_problems
assert reference_problems, "the converter's GPT-2 adapter now passes llama.cpp's shape check: revisit the transposition"
print(f"GPT-2: lorafit's pairs pass llama.cpp's shape check; the converter's fail it ({reference_problems[0]})")
"#;

/// Runs Python scripts the way `python SCRIPT ARGS...` would, all in this one process, so that
/// torch, transformers and the converter's modules are imported once rather than once per step.
/// argv[1]: a JSON list of jobs, `{"name": str, "steps": [[script, arg, ...], ...]}`. The steps of
/// a job run in order until one fails (an exception or a non-zero exit); prints one JSON line per
/// job: `{"name", "failed_step": index or null, "outputs": [stdout and stderr per step run],
/// "seconds": [...]}`.
const BATCH_PY: &str = r#"
import contextlib, io, json, logging, runpy, sys, time, traceback

class CurrentStderr:
    """The converter logs through `logging`, whose handler keeps the stream it was given: this
    one writes to the stderr of the step that runs now."""
    def write(self, text):
        return sys.stderr.write(text)
    def flush(self):
        sys.stderr.flush()

# What the converter's own basicConfig sets up (its call then does nothing).
logging.basicConfig(stream=CurrentStderr(), level=logging.INFO)
for job in json.load(open(sys.argv[1])):
    outputs, seconds, failed = [], [], None
    for i, argv in enumerate(job["steps"]):
        out, t0, ok = io.StringIO(), time.perf_counter(), True
        sys.argv = list(argv)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                runpy.run_path(argv[0], run_name="__main__")
            except SystemExit as e:
                ok = e.code in (None, 0)
                if not ok:
                    print(f"exit status {e.code}")
            except BaseException:
                traceback.print_exc()
                ok = False
        seconds.append(time.perf_counter() - t0)
        outputs.append(out.getvalue())
        if not ok:
            failed = i
            break
    print(json.dumps({"name": job["name"], "failed_step": failed, "outputs": outputs, "seconds": seconds}),
          flush=True)
"#;

/// One step of a [`PyJob`]: `script` with `args`, and what it checks, for the failure message.
struct PyStep {
    what: String,
    script: PathBuf,
    args: Vec<PathBuf>,
}

/// Steps that run in order in [`Converter::run_all`]'s one Python process.
struct PyJob {
    name: String,
    steps: Vec<PyStep>,
}

/// What each step of a job that passed printed, and how long it took.
struct PyReport {
    outputs: Vec<String>,
    seconds: Vec<f64>,
}

/// The fetched converter and the environment to run it in, or `None` (after `common::skip`) when
/// it cannot run here.
struct Converter {
    python: PathBuf,
    script: PathBuf,
    pythonpath: String,
}

impl Converter {
    fn find() -> Option<Converter> {
        let python = common::python()?;
        let fetch = common::repo().join("scripts/interop/fetch_llama_cpp_converter.sh");
        let out = Command::new("bash").arg(&fetch).env("LORAFIT_PYTHON", &python).output().expect("run bash");
        if !out.status.success() {
            common::skip(&format!(
                "scripts/interop/fetch_llama_cpp_converter.sh failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return None;
        }
        let script = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let dir = script.parent().unwrap();
        let pythonpath = format!("{}:{}", dir.join("gguf-py").display(), dir.display());
        let converter = Converter { python, script, pythonpath };
        let probe = converter
            .python()
            .args(["-c", "import torch, transformers, safetensors, numpy, gguf, conversion"])
            .output()
            .expect("run python");
        if !probe.status.success() {
            common::skip(&format!(
                "llama.cpp's converter cannot run in {}: {}",
                converter.python.display(),
                String::from_utf8_lossy(&probe.stderr).trim().lines().last().unwrap_or("")
            ));
            return None;
        }
        Some(converter)
    }

    fn python(&self) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.env("PYTHONPATH", &self.pythonpath).env("HF_HUB_OFFLINE", "1").env("TRANSFORMERS_OFFLINE", "1");
        cmd
    }

    /// Runs every job in one Python process and panics naming each job that fails, the step
    /// that failed and its output.
    fn run_all(&self, scratch: &Path, jobs: &[PyJob]) -> Vec<PyReport> {
        let driver = snippet(scratch, "batch.py", BATCH_PY);
        let spec: Vec<serde_json::Value> = jobs
            .iter()
            .map(|job| {
                let steps: Vec<Vec<&Path>> = job
                    .steps
                    .iter()
                    .map(|step| {
                        std::iter::once(step.script.as_path())
                            .chain(step.args.iter().map(PathBuf::as_path))
                            .collect()
                    })
                    .collect();
                serde_json::json!({"name": job.name, "steps": steps})
            })
            .collect();
        let jobs_file = scratch.join("batch-jobs.json");
        std::fs::write(&jobs_file, serde_json::Value::Array(spec).to_string()).unwrap();
        let out = self.python().arg(&driver).arg(&jobs_file).output().expect("run python");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "the Python batch failed:\n{stdout}{stderr}");
        let results: Vec<serde_json::Value> =
            stdout.lines().filter_map(|line| serde_json::from_str(line).ok()).collect();
        let names: Vec<&str> = results.iter().map(|r| r["name"].as_str().unwrap_or("?")).collect();
        let wanted: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, wanted, "the Python batch did not report on every job:\n{stdout}{stderr}");
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let failures: Vec<String> = jobs
            .iter()
            .zip(&results)
            .filter_map(|(job, r)| {
                let step = r["failed_step"].as_u64()? as usize;
                let output = r["outputs"].as_array().and_then(|o| o.last()).map(text).unwrap_or_default();
                Some(format!("{}: {}:\n{output}", job.name, job.steps[step].what))
            })
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        results
            .iter()
            .map(|r| PyReport {
                outputs: r["outputs"].as_array().unwrap().iter().map(text).collect(),
                seconds: r["seconds"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap()).collect(),
            })
            .collect()
    }

    /// The converter run as `convert_lora_to_gguf.py --base MODEL --outfile OUT --outtype T ADAPTER`.
    fn convert(&self, model: &Path, adapter: &Path, out: &Path, outtype: &str) -> PyStep {
        let args = [Path::new("--base"), model, Path::new("--outfile"), out, Path::new("--outtype")];
        PyStep {
            what: format!("convert_lora_to_gguf.py failed for {}", adapter.display()),
            script: self.script.clone(),
            args: args.iter().chain([&Path::new(outtype), &adapter]).map(|a| a.to_path_buf()).collect(),
        }
    }
}

/// Writes a Python snippet to `scratch/name`, to run as a script.
fn snippet(scratch: &Path, name: &str, code: &str) -> PathBuf {
    let path = scratch.join(name);
    std::fs::write(&path, code).unwrap();
    path
}

fn fixtures() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(common::repo().join("tests/fixtures/models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("adapter/adapter_config.json").exists())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn matches_llama_cpp_converter_on_every_fixture() {
    let Some(converter) = Converter::find() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = fixtures();
    assert!(fixtures.len() >= 10, "expected the model fixtures, found {fixtures:?}");
    let compare = snippet(tmp.path(), "compare.py", COMPARE_PY);
    let gpt2_loader = snippet(tmp.path(), "gpt2_loader.py", GPT2_LOADER_PY);
    // lorafit exports every file here; one Python process then converts and compares them all.
    let (mut cases, mut jobs) = (vec![], vec![]);
    for model in &fixtures {
        let name = model.file_name().unwrap().to_string_lossy().into_owned();
        let adapter = model.join("adapter");
        // GPT-2: the converter transposes A and B like Conv1D weights; lorafit does not.
        let layout = if name.starts_with("gpt2") { "transposed" } else { "same" };
        let outtypes: &[(&str, GgufDtype)] = if matches!(name.as_str(), "llama3" | "phi3" | "gemma3") {
            &[("f32", GgufDtype::F32), ("f16", GgufDtype::F16), ("bf16", GgufDtype::Bf16)]
        } else {
            &[("f32", GgufDtype::F32)]
        };
        for &(outtype, dtype) in outtypes {
            let reference = tmp.path().join(format!("{name}-{outtype}-converter.gguf"));
            let ours = tmp.path().join(format!("{name}-{outtype}-lorafit.gguf"));
            let t0 = Instant::now();
            let report = export(&adapter, model, &ours, dtype).unwrap();
            let t_lorafit = t0.elapsed();
            assert!(report.warnings.is_empty(), "{name}: {:?}", report.warnings);
            assert_eq!(report.bytes, std::fs::metadata(&ours).unwrap().len());
            let what = format!("{name} ({outtype})");
            let mut steps = vec![
                converter.convert(model, &adapter, &reference, outtype),
                PyStep {
                    what: "lorafit's GGUF differs from the converter's".into(),
                    script: compare.clone(),
                    args: vec![reference.clone(), ours.clone(), layout.into()],
                },
            ];
            if layout == "transposed" {
                steps.push(PyStep {
                    what: "GPT-2 shapes".into(),
                    script: gpt2_loader.clone(),
                    args: vec![model.clone(), ours.clone(), reference.clone()],
                });
            }
            jobs.push(PyJob { name: what.clone(), steps });
            cases.push((what, layout, reference, ours, report, t_lorafit));
        }
    }
    let reports = converter.run_all(tmp.path(), &jobs);
    for ((what, layout, reference, ours, report, t_lorafit), py) in cases.iter().zip(&reports) {
        let identical = std::fs::read(reference).unwrap() == std::fs::read(ours).unwrap();
        if *layout == "same" {
            assert!(identical, "{what}: equal content but not byte-identical files");
        } else {
            eprintln!("{}", py.outputs[2].trim());
        }
        eprintln!(
            "{what}: {} tensors, {} bytes, byte-identical: {identical}; lorafit {:.1} ms, converter {:.1} s; {}",
            report.tensors,
            report.bytes,
            t_lorafit.as_secs_f64() * 1e3,
            py.seconds[0],
            py.outputs[1].trim()
        );
    }
}

#[test]
fn folds_rslora_and_patterns_into_the_same_effective_update_as_peft() {
    let Some(converter) = Converter::find() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = common::repo().join("tests/fixtures/models/llama3");
    let adapter = tmp.path().join("adapter");
    let variant = PyStep {
        what: "writing the variant adapter".into(),
        script: snippet(tmp.path(), "variant.py", VARIANT_PY),
        args: vec![model.join("adapter"), adapter.clone()],
    };
    converter.run_all(tmp.path(), &[PyJob { name: "variant".into(), steps: vec![variant] }]);
    let ours = tmp.path().join("variant.gguf");
    let report = export(&adapter, &model, &ours, GgufDtype::F32).unwrap();
    eprintln!("warnings:\n  {}", report.warnings.join("\n  "));
    assert!(report.warnings.iter().any(|w| w.contains("rsLoRA")), "{:?}", report.warnings);
    assert!(report.warnings.iter().any(|w| w.contains("q_proj")), "{:?}", report.warnings);
    assert!(report.warnings.iter().any(|w| w.contains("layers.1.mlp.down_proj")), "{:?}", report.warnings);
    // The converter keeps lora_alpha and ignores rsLoRA and the patterns: its file scales wrongly.
    let effective = snippet(tmp.path(), "effective.py", EFFECTIVE_PY);
    let reference = tmp.path().join("variant-converter.gguf");
    let steps = vec![
        PyStep {
            what: "rsLoRA/pattern fold".into(),
            script: effective.clone(),
            args: vec![model.clone(), adapter.clone(), ours, "equal".into()],
        },
        converter.convert(&model, &adapter, &reference, "f32"),
        PyStep {
            what: "the converter's file on rsLoRA/patterns".into(),
            script: effective,
            args: vec![model, adapter, reference, "differs".into()],
        },
    ];
    let reports = converter.run_all(tmp.path(), &[PyJob { name: "llama3 variant".into(), steps }]);
    eprintln!("lorafit: {}", reports[0].outputs[0].trim());
    eprintln!("converter: {}", reports[0].outputs[2].trim());
}

/// Copies a fixture's config and adapter into a tempdir, with `edit` applied to config.json.
fn model_variant(tmp: &Path, fixture: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = common::repo().join("tests/fixtures/models").join(fixture);
    let dir = tmp.join(fixture);
    std::fs::create_dir_all(&dir).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    dir
}

#[test]
fn mismatches_name_the_first_offending_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = common::repo().join("tests/fixtures/models");
    let llama_adapter = fixtures.join("llama3/adapter");
    let out = tmp.path().join("x.gguf");

    // Shapes: the base's MLP is wider than the adapter was trained for.
    let wider = model_variant(tmp.path(), "llama3", |c| c["intermediate_size"] = 96.into());
    let err = format!("{:#}", export(&llama_adapter, &wider, &out, GgufDtype::F32).unwrap_err());
    assert!(err.contains("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"), "{err}");

    // Modules: a Llama adapter on GPT-2.
    let err =
        format!("{:#}", export(&llama_adapter, &fixtures.join("gpt2"), &out, GgufDtype::F32).unwrap_err());
    assert!(err.contains("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"), "{err}");
    assert!(err.contains("not a linear layer"), "{err}");

    // Layers: fewer in the base than in the adapter.
    let shallow = model_variant(tmp.path(), "mistral", |c| c["num_hidden_layers"] = 1.into());
    let err = format!(
        "{:#}",
        export(&fixtures.join("mistral/adapter"), &shallow, &out, GgufDtype::F32).unwrap_err()
    );
    assert!(err.contains("layers.1.") && err.contains("layer 1 does not exist"), "{err}");

    // Families: an architecture lorafit does not know.
    let unknown = model_variant(tmp.path(), "qwen2", |c| c["model_type"] = "gpt_neox".into());
    let err =
        format!("{:#}", export(&fixtures.join("qwen2/adapter"), &unknown, &out, GgufDtype::F32).unwrap_err());
    assert!(err.contains("gpt_neox"), "{err}");
    assert!(!out.exists(), "a failed export must not leave a file");
}

#[test]
fn writes_a_gguf_v3_adapter_without_python() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::repo().join("tests/fixtures/models/qwen3");
    let out = tmp.path().join("qwen3.gguf");
    let report = export(&model.join("adapter"), &model, &out, GgufDtype::Bf16).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..4], b"GGUF");
    assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
    assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), report.tensors as u64);
    assert_eq!(report.tensors, 28, "2 layers × 7 modules × (A, B)");
    let text = String::from_utf8_lossy(&bytes);
    for needle in ["general.architecture", "qwen3", "adapter.lora.alpha", "blk.1.attn_q.weight.lora_b"] {
        assert!(text.contains(needle), "no `{needle}` in the file");
    }
}

/// Runs a base GGUF with a GGUF LoRA in llama.cpp (the `llama_cpp` bindings built by
/// `fetch_llama_cpp_converter.sh --runtime`) and prints the greedy continuation of a prompt as
/// JSON. argv: base.gguf, adapter.gguf, model dir (its tokenizer.json), prompt text as lorafit
/// puts it to the model (`<s>` first), most new tokens. The prompt's llama.cpp tokens must be
/// those of the Hugging Face tokenizer, or the answers could not be compared.
const LLAMA_CPP_ANSWER_PY: &str = r#"
import json, sys
import llama_cpp
from tokenizers import Tokenizer

base, adapter, model_dir, prompt, max_new = sys.argv[1:6]
text = prompt.removeprefix("<s>")
llm = llama_cpp.Llama(model_path=base, lora_path=adapter, n_ctx=256, n_threads=1, verbose=False)
ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
hf = Tokenizer.from_file(f"{model_dir}/tokenizer.json").encode(text).ids
assert ids == hf, f"llama.cpp tokenizes the prompt as {ids}, the Hugging Face tokenizer as {hf}"
answer = []
for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
    if token == llm.token_eos() or len(answer) == int(max_new):
        break
    answer.append(token)
print(json.dumps({"answer": llm.detokenize(answer).decode("utf-8"), "prompt_tokens": len(ids)}))
"#;

/// llama.cpp's library and Python bindings, built once by the fetch script, or `None` (after
/// `common::skip`) when they cannot be built here.
fn llama_cpp_runtime(python: &Path) -> Option<PathBuf> {
    let fetch = common::repo().join("scripts/interop/fetch_llama_cpp_converter.sh");
    let out = Command::new("bash").arg(&fetch).arg("--runtime").env("LORAFIT_PYTHON", python).output();
    let out = out.expect("run bash");
    if !out.status.success() {
        common::skip(&format!(
            "scripts/interop/fetch_llama_cpp_converter.sh --runtime failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
        return None;
    }
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The README's journey with the shipped default model: train, `export --format gguf`, the base
/// converted by llama.cpp's converter through scripts/base_to_gguf.py, then llama.cpp itself
/// answers a held-out question with the adapter exactly as `lorafit generate` does.
#[test]
fn the_default_model_answers_in_llama_cpp_as_in_lorafit() {
    let Some(converter) = Converter::find() else { return };
    let Some(runtime) = llama_cpp_runtime(&converter.python) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (t, repo) = (tmp.path(), common::repo());
    let run = |args: &[&str]| {
        let out = common::lorafit(&repo, args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{args:?}: {stderr}");
        (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
    };
    let out_dir = format!("output.dir={}", t.display());
    run(&[
        "train",
        "configs/default.yaml",
        "--set",
        &out_dir,
        "--set",
        "output.run_name=journey",
        "--log-format",
        "quiet",
    ]);
    let run_dir = t.join("journey");
    let adapter_gguf = t.join("adapter.gguf");
    let adapter = run_dir.join("adapter");
    let a = [adapter.to_str().unwrap(), adapter_gguf.to_str().unwrap()];
    run(&["export", "--adapter", a[0], "--format", "gguf", "--dtype", "f32", "--out", a[1]]);

    // A held-out question (data/default/val.jsonl), answered by lorafit before and after.
    let question = "Name the best friend of the Grubbet.";
    let r = run_dir.to_str().unwrap();
    let (answers, prompt) = run(&[
        "generate",
        "--run",
        r,
        "--prompt",
        question,
        "--compare",
        "--show-prompt",
        "--max-new-tokens",
        "32",
    ]);
    let (base_answer, adapted) = answers
        .trim_start_matches("── base model ──\n")
        .split_once("── with the adapter ──\n")
        .unwrap_or_else(|| panic!("unexpected generate output: {answers}"));
    assert_ne!(base_answer.trim(), adapted.trim(), "the adapter does not change the answer");

    let model = repo.join("data/default-model");
    let base_gguf = t.join("base.gguf");
    let to_gguf = [Path::new("--outfile"), &base_gguf, Path::new("--outtype"), Path::new("f32")];
    let out = converter
        .python()
        .arg(repo.join("scripts/base_to_gguf.py"))
        .arg(converter.script.parent().unwrap())
        .arg(&model)
        .args(to_gguf)
        .output()
        .expect("run python");
    assert!(out.status.success(), "scripts/base_to_gguf.py: {}", String::from_utf8_lossy(&out.stderr));

    let files = [base_gguf.as_path(), adapter_gguf.as_path(), model.as_path()];
    // `--show-prompt` ends the prompt (which ends in a newline itself) with one more.
    let reply =
        llama_cpp_answer(t, &converter.python, &runtime, files, prompt.strip_suffix('\n').unwrap_or(&prompt));
    assert_eq!(reply["answer"].as_str().unwrap(), adapted.trim_end_matches('\n'), "llama.cpp's answer");
    eprintln!(
        "{question} → lorafit and llama.cpp: {:?} (base model: {:?})",
        adapted.trim(),
        base_answer.trim()
    );
}

/// llama.cpp's greedy answer ([`LLAMA_CPP_ANSWER_PY`]) to `prompt` with `files`: base GGUF,
/// adapter GGUF, model directory.
fn llama_cpp_answer(
    scratch: &Path,
    python: &Path,
    runtime: &Path,
    files: [&Path; 3],
    prompt: &str,
) -> serde_json::Value {
    let script = snippet(scratch, "llama_cpp_answer.py", LLAMA_CPP_ANSWER_PY);
    let out = Command::new(python)
        .env("PYTHONPATH", runtime)
        .arg(script)
        .args(files)
        .args([prompt, "32"])
        .output()
        .expect("run python");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "llama.cpp: {stdout}{stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}
