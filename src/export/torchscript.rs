//! `model.pt`: a scripted TorchScript module (not a trace), built with
//! libtorch's C++ `torch::jit::Module` through a small C++ shim
//! (`torchscript_shim.cpp`): named parameters `W_enc`, `b_enc`, `W_dec`,
//! `b_dec` (plus `threshold` for jumprelu, `enc_layers_{i}_W/_b` and
//! `dec_layers_{i}_W/_b` for deep models, `W_skip [d_out, d_in]` for skip
//! models, whose `forward` adds `x_n @ W_skip.T` and whose `decode(z)`,
//! having no input, leaves it out), buffers `norm_shift`/`norm_scale`
//! when the model normalises its input (`out_norm_*` for a transcoder's
//! output, `threshold` for batchtopk), attributes describing the
//! architecture, and methods `encode(x)`, `decode(z)`, `forward(x)` and
//! `activation(pre)`, for any batch size. `torch.jit.load(path)` alone loads
//! it in Python.
//!
//! Reading accepts our own modules and modules scripted in Python that hold
//! the four weights as top-level parameters (or buffers) and have `encode`
//! and `decode` methods. The architecture comes from the attributes our
//! export writes (`activation`, `k`, `decoder_activation`,
//! `apply_b_dec_to_input`, `tied`, `normalize`, ...); any that are missing
//! are inferred by running the module's own `encode`/`decode` on probe
//! inputs. Either way the loaded model is checked against the module's
//! methods on those probes, so a module that computes something else is
//! refused with a clear error.
//!
//! To support a new activation, add an arm to `activation_code` (its
//! TorchScript and any extra parameters/attributes) and, when a Python
//! module without attributes should be recognised, to `probe_candidates`.

use crate::arch::exports::{ActivationCode, AttrValue};
use crate::arch::Activation;
use crate::config::{ActivationKind, NormalizeKind, OutputActivation};
use crate::data::dataset::SplitMix64;
use crate::error::user;
use crate::model::{Gate, Layer, ModelSpec, Sae};
use crate::normalize::Normalizer;
use crate::{bail_user, Result};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

mod ffi {
    use super::*;

    pub const STR: i32 = 0;
    pub const INT: i32 = 1;
    pub const BOOL: i32 = 2;
    pub const FLOAT: i32 = 3;

    #[repr(C)]
    pub struct Attr {
        pub name: *const c_char,
        pub kind: i32,
        pub str_value: *const c_char,
        pub int_value: i64,
        pub float_value: f64,
    }

    pub type TensorCb = extern "C" fn(*mut c_void, *const c_char, i32, *mut C_tensor);
    pub type AttrCb = extern "C" fn(*mut c_void, *const c_char, i32, *const c_char, i64, f64);
    pub type MethodCb = extern "C" fn(*mut c_void, *const c_char);

    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn sae_ts_save(
            path: *const c_char,
            class_name: *const c_char,
            source: *const c_char,
            tensor_names: *const *const c_char,
            tensors: *const *const C_tensor,
            is_param: *const i32,
            n_tensors: i32,
            attrs: *const Attr,
            n_attrs: i32,
        ) -> *mut c_char;
        pub fn sae_ts_read(
            path: *const c_char,
            ctx: *mut c_void,
            tensor_cb: TensorCb,
            attr_cb: AttrCb,
            method_cb: MethodCb,
        ) -> *mut c_char;
    }
}

/// What goes into a scripted module.
pub struct ModuleDef {
    /// TorchScript class name, e.g. `__torch__.sae.SparseAutoencoder`.
    pub class_name: String,
    /// Method definitions (TorchScript, `def name(self, ...)`).
    pub source: String,
    /// (name, tensor, is_parameter); non-parameters become buffers.
    pub tensors: Vec<(String, Tensor, bool)>,
    pub attrs: Vec<(String, AttrValue)>,
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| anyhow::anyhow!("{what} contains a NUL byte"))
}

fn path_cstring(path: &Path) -> Result<CString> {
    cstring(&path.to_string_lossy(), &format!("path {}", path.display()))
}

/// Writes `def` as a TorchScript module to `path` (not atomically; see
/// [`save_module_atomic`]).
fn save_module_to(def: &ModuleDef, path: &Path) -> Result<()> {
    let path_c = path_cstring(path)?;
    let class_c = cstring(&def.class_name, "class name")?;
    let source_c = cstring(&def.source, "TorchScript source")?;
    let cpu: Vec<Tensor> = def
        .tensors
        .iter()
        .map(|(_, t, _)| t.detach().to_device(Device::Cpu).to_kind(Kind::Float))
        .collect();
    let names: Vec<CString> = def
        .tensors
        .iter()
        .map(|(n, _, _)| cstring(n, "tensor name"))
        .collect::<Result<_>>()?;
    let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let tensor_ptrs: Vec<*const C_tensor> = cpu.iter().map(|t| t.as_ptr()).collect();
    let is_param: Vec<i32> = def.tensors.iter().map(|(_, _, p)| *p as i32).collect();
    let attr_names: Vec<CString> = def
        .attrs
        .iter()
        .map(|(n, _)| cstring(n, "attribute name"))
        .collect::<Result<_>>()?;
    let attr_strs: Vec<CString> = def
        .attrs
        .iter()
        .map(|(n, v)| match v {
            AttrValue::Str(s) => cstring(s, n),
            _ => cstring("", n),
        })
        .collect::<Result<_>>()?;
    let attrs: Vec<ffi::Attr> = def
        .attrs
        .iter()
        .enumerate()
        .map(|(i, (_, v))| {
            let (kind, int_value, float_value) = match v {
                AttrValue::Str(_) => (ffi::STR, 0, 0.0),
                AttrValue::Int(x) => (ffi::INT, *x, 0.0),
                AttrValue::Bool(b) => (ffi::BOOL, *b as i64, 0.0),
                AttrValue::Float(f) => (ffi::FLOAT, 0, *f),
            };
            ffi::Attr {
                name: attr_names[i].as_ptr(),
                kind,
                str_value: attr_strs[i].as_ptr(),
                int_value,
                float_value,
            }
        })
        .collect();
    // SAFETY: every pointer refers to a live local (CStrings, tensors, attrs)
    // for the duration of the call; the shim copies what it keeps.
    let err = unsafe {
        ffi::sae_ts_save(
            path_c.as_ptr(),
            class_c.as_ptr(),
            source_c.as_ptr(),
            name_ptrs.as_ptr(),
            tensor_ptrs.as_ptr(),
            is_param.as_ptr(),
            def.tensors.len() as i32,
            attrs.as_ptr(),
            attrs.len() as i32,
        )
    };
    match crate::shim::take_error(err) {
        None => Ok(()),
        Some(e) => Err(anyhow::anyhow!(
            "building TorchScript module {}: {}",
            path.display(),
            first_line(&e)
        )),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s).trim()
}

/// Writes the module to a temp file beside `path`, then renames it over
/// `path`: readers see the old file, the new one, or none.
pub fn save_module_atomic(def: &ModuleDef, path: &Path) -> Result<()> {
    if path.is_dir() {
        bail_user!("{}: is a directory; pass a file path", path.display());
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail_user!(
                "cannot write {}: directory {} does not exist",
                path.display(),
                dir.display()
            );
        }
    }
    let tmp = crate::fsutil::temp_path(path);
    let result = save_module_to(def, &tmp).and_then(|()| {
        std::fs::rename(&tmp, path)
            .map_err(|e| anyhow::anyhow!("renaming into {}: {e}", path.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A module's top-level tensors, simple attributes and methods.
#[derive(Default)]
pub struct ModuleContents {
    /// name → (tensor on the CPU, is_parameter)
    pub tensors: HashMap<String, (Tensor, bool)>,
    pub attrs: HashMap<String, AttrValue>,
    pub methods: Vec<String>,
}

extern "C" fn on_tensor(ctx: *mut c_void, name: *const c_char, is_param: i32, t: *mut C_tensor) {
    // SAFETY: ctx is the &mut ModuleContents passed to sae_ts_read; the shim
    // hands over ownership of a heap-allocated torch::Tensor.
    let out = unsafe { &mut *(ctx as *mut ModuleContents) };
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    let t = unsafe { Tensor::from_ptr(t) };
    out.tensors.insert(name, (t, is_param != 0));
}

extern "C" fn on_attr(
    ctx: *mut c_void,
    name: *const c_char,
    kind: i32,
    s: *const c_char,
    i: i64,
    f: f64,
) {
    // SAFETY: as in on_tensor; strings are valid for the call.
    let out = unsafe { &mut *(ctx as *mut ModuleContents) };
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    let v = match kind {
        ffi::STR => AttrValue::Str(unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()),
        ffi::INT => AttrValue::Int(i),
        ffi::BOOL => AttrValue::Bool(i != 0),
        _ => AttrValue::Float(f),
    };
    out.attrs.insert(name, v);
}

extern "C" fn on_method(ctx: *mut c_void, name: *const c_char) {
    // SAFETY: as in on_tensor.
    let out = unsafe { &mut *(ctx as *mut ModuleContents) };
    out.methods.push(
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned(),
    );
}

/// Reads a TorchScript file's contents (on the CPU).
pub fn read_module(path: &Path) -> Result<ModuleContents> {
    let path_c = path_cstring(path)?;
    let mut out = ModuleContents::default();
    // SAFETY: the callbacks only run during this call and cast ctx back to
    // the ModuleContents it points to.
    let err = unsafe {
        ffi::sae_ts_read(
            path_c.as_ptr(),
            &mut out as *mut ModuleContents as *mut c_void,
            on_tensor,
            on_attr,
            on_method,
        )
    };
    match crate::shim::take_error(err) {
        None => Ok(out),
        Some(e) => Err(user(format!(
            "{}: cannot load as a TorchScript module: {}",
            path.display(),
            first_line(&e)
        ))),
    }
}

// ---------------------------------------------------------------------------
// The SAE as a module.

const CLASS_NAME: &str = "__torch__.sae.SparseAutoencoder";

fn activation_code(model: &Sae) -> ActivationCode {
    model.spec.activation.arch().torchscript(model)
}

fn kind_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// TorchScript attribute names of deep layers (no dots allowed there;
/// safetensors uses `enc_layers.{i}.W`).
fn layer_names(side: &str, i: usize) -> (String, String) {
    (
        format!("{side}_layers_{i}_W"),
        format!("{side}_layers_{i}_b"),
    )
}

/// The module definition of `model`.
pub fn module_def(model: &Sae) -> ModuleDef {
    let act = activation_code(model);
    let source = module_source(model, &act);
    let mut tensors = vec![
        ("W_enc".to_string(), model.w_enc.shallow_clone(), true),
        ("b_enc".to_string(), model.b_enc.shallow_clone(), true),
        // A tied model still exports W_dec (a copy of W_enc.T).
        (
            "W_dec".to_string(),
            model.decoder_weight().contiguous(),
            true,
        ),
        ("b_dec".to_string(), model.b_dec.shallow_clone(), true),
    ];
    tensors.extend(act.tensors);
    tensors.extend(layer_and_norm_tensors(model));
    if let Some(w) = &model.w_skip {
        tensors.push(("W_skip".to_string(), w.shallow_clone(), true));
    }
    let mut attrs = architecture_attrs(model);
    attrs.extend(act.attrs);
    ModuleDef {
        class_name: CLASS_NAME.into(),
        source,
        tensors,
        attrs,
    }
}

/// The methods `encode`, `activation` (or `codes`, see [`ActivationCode`]),
/// `decode` and `forward`.
fn module_source(model: &Sae, act: &ActivationCode) -> String {
    let mut src = encode_source(model, act.from_input);
    if act.from_input {
        src.push_str("def codes(self, x: Tensor) -> Tensor:\n");
    } else {
        src.push_str("def activation(self, pre: Tensor) -> Tensor:\n");
    }
    src.push_str(&act.body);
    src.push('\n');
    src.push_str(&decode_source(model));
    src.push_str(&forward_source(model));
    src
}

/// `forward(x)`: `decode(encode(x))`; skip models add `x_n @ W_skip.T` to
/// the decoder's output before it is un-normalised (their validation
/// rules out deep layers and an output activation).
fn forward_source(model: &Sae) -> String {
    let mut src = String::from("def forward(self, x: Tensor) -> Tensor:\n");
    if model.w_skip.is_none() {
        src.push_str("    return self.decode(self.encode(x))\n");
        return src;
    }
    src.push_str("    z = self.encode(x)\n");
    if has_norm(&model.norm) {
        src.push_str("    x = (x - self.norm_shift) / self.norm_scale\n");
    }
    src.push_str(
        "    out = torch.matmul(z, self.W_dec) + self.b_dec + torch.matmul(x, self.W_skip.t())\n",
    );
    if let Some(p) = out_norm_prefix(model) {
        src.push_str(&format!("    out = out * self.{p}scale + self.{p}shift\n"));
    }
    src.push_str("    return out\n");
    src
}

/// The prefix of the buffers that un-normalise the output: the input's
/// (`norm_`), a transcoder's own (`out_norm_`), or none.
fn out_norm_prefix(model: &Sae) -> Option<&'static str> {
    match &model.out_norm {
        None => has_norm(&model.norm).then_some("norm_"),
        Some(n) => has_norm(n).then_some("out_norm_"),
    }
}

fn has_norm(n: &Normalizer) -> bool {
    n.shift.is_some() && n.scale.is_some()
}

fn encode_source(model: &Sae, from_input: bool) -> String {
    let mut src = String::new();
    src.push_str("def encode(self, x: Tensor) -> Tensor:\n");
    if has_norm(&model.norm) {
        src.push_str("    x = (x - self.norm_shift) / self.norm_scale\n");
    }
    for i in 0..model.enc_layers.len() {
        let (w, b) = layer_names("enc", i);
        src.push_str(&format!(
            "    x = torch.relu(torch.matmul(x, self.{w}) + self.{b})\n"
        ));
    }
    if model.spec.apply_b_dec_to_input {
        src.push_str("    x = x - self.b_dec\n");
    }
    if from_input {
        src.push_str("    return self.codes(x)\n\n");
        return src;
    }
    src.push_str("    pre = torch.matmul(x, self.W_enc) + self.b_enc\n");
    src.push_str("    return self.activation(pre)\n\n");
    src
}

fn decode_source(model: &Sae) -> String {
    // The output is un-normalised with the input's statistics, or with its
    // own (transcoders: out_norm_*), or not at all.
    let out_norm_prefix = out_norm_prefix(model);
    let mut src = String::new();
    src.push_str("def decode(self, z: Tensor) -> Tensor:\n");
    src.push_str("    out = torch.matmul(z, self.W_dec) + self.b_dec\n");
    for i in 0..model.dec_layers.len() {
        let (w, b) = layer_names("dec", i);
        src.push_str(&format!(
            "    out = torch.matmul(torch.relu(out), self.{w}) + self.{b}\n"
        ));
    }
    if model.spec.decoder_activation == OutputActivation::Sigmoid {
        src.push_str("    out = torch.sigmoid(out)\n");
    }
    if let Some(p) = out_norm_prefix {
        src.push_str(&format!("    out = out * self.{p}scale + self.{p}shift\n"));
    }
    src.push_str("    return out\n\n");
    src
}

/// Deep layers (parameters), then the input's and the output's
/// normalisation (buffers), where the model has them.
fn layer_and_norm_tensors(model: &Sae) -> Vec<(String, Tensor, bool)> {
    let mut tensors = Vec::new();
    for (side, layers) in [("enc", &model.enc_layers), ("dec", &model.dec_layers)] {
        for (i, l) in layers.iter().enumerate() {
            let (w, b) = layer_names(side, i);
            tensors.push((w, l.w.shallow_clone(), true));
            tensors.push((b, l.b.shallow_clone(), true));
        }
    }
    if let (Some(shift), Some(scale)) = (&model.norm.shift, &model.norm.scale) {
        tensors.push(("norm_shift".into(), shift.shallow_clone(), false));
        tensors.push(("norm_scale".into(), scale.shallow_clone(), false));
    }
    if let Some((Some(shift), Some(scale))) = model.out_norm.as_ref().map(|n| (&n.shift, &n.scale))
    {
        tensors.push(("out_norm_shift".into(), shift.shallow_clone(), false));
        tensors.push(("out_norm_scale".into(), scale.shallow_clone(), false));
    }
    tensors
}

/// The attributes describing the architecture (see the module's doc).
fn architecture_attrs(model: &Sae) -> Vec<(String, AttrValue)> {
    let s = &model.spec;
    let mut attrs = vec![
        (
            "sae_format".to_string(),
            AttrValue::Str(super::safetensors::FORMAT.into()),
        ),
        ("d_in".into(), AttrValue::Int(s.d_in)),
        ("d_hidden".into(), AttrValue::Int(s.d_hidden)),
        ("d_out".into(), AttrValue::Int(model.d_out())),
        (
            "activation".into(),
            AttrValue::Str(kind_name(&s.activation.kind())),
        ),
        (
            "decoder_activation".into(),
            AttrValue::Str(kind_name(&s.decoder_activation)),
        ),
        (
            "apply_b_dec_to_input".into(),
            AttrValue::Bool(s.apply_b_dec_to_input),
        ),
        ("tied".into(), AttrValue::Bool(s.tied)),
        (
            "normalize".into(),
            AttrValue::Str(kind_name(&model.norm.kind)),
        ),
    ];
    if let Some(n) = &model.out_norm {
        attrs.push(("out_normalize".into(), AttrValue::Str(kind_name(&n.kind))));
    }
    if model.w_skip.is_some() {
        attrs.push(("skip_connection".into(), AttrValue::Bool(true)));
    }
    attrs
}

/// Writes `model` as a scripted TorchScript module, atomically.
pub fn save(model: &Sae, path: &Path) -> Result<()> {
    save_module_atomic(&module_def(model), path)
}

/// Whether `path` looks like a TorchScript file (a zip archive).
pub fn looks_like_torchscript(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"PK\x03\x04"
}

fn parse_kind<T: serde::de::DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s.into())).ok()
}

/// Takes tensor `name` as float32, checking its shape (`None`: any 2-D).
fn take_tensor(
    c: &mut ModuleContents,
    name: &str,
    shape: Option<&[i64]>,
    path: &Path,
) -> Result<Tensor> {
    let Some((t, _)) = c.tensors.remove(name) else {
        let mut have: Vec<&str> = c.tensors.keys().map(String::as_str).collect();
        have.sort();
        bail_user!(
            "{}: TorchScript module has no top-level parameter or buffer `{name}` \
             (it has: {}); expected W_enc [d_in, d_hidden], b_enc, W_dec [d_hidden, d_out], b_dec",
            path.display(),
            if have.is_empty() {
                "none".to_string()
            } else {
                have.join(", ")
            }
        );
    };
    let ok = match shape {
        Some(s) => t.size() == s,
        None => t.dim() == 2,
    };
    if !ok {
        bail_user!(
            "{}: `{name}` has shape {:?}, expected {}",
            path.display(),
            t.size(),
            match shape {
                Some(s) => format!("{s:?}"),
                None => "a matrix".into(),
            }
        );
    }
    Ok(t.to_kind(Kind::Float))
}

/// Deep layers `{side}_layers_{i}_W/_b` chained from width `from`.
fn take_layers(
    c: &mut ModuleContents,
    side: &str,
    mut from: i64,
    path: &Path,
) -> Result<(Vec<Layer>, i64)> {
    let mut layers = Vec::new();
    loop {
        let (w, b) = layer_names(side, layers.len());
        if !c.tensors.contains_key(&w) {
            return Ok((layers, from));
        }
        let wt = take_tensor(c, &w, None, path)?;
        if wt.size()[0] != from {
            bail_user!(
                "{}: `{w}` has shape {:?}, but its input width is {from}",
                path.display(),
                wt.size()
            );
        }
        let to = wt.size()[1];
        let bt = take_tensor(c, &b, Some(&[to]), path)?;
        layers.push(Layer { w: wt, b: bt });
        from = to;
    }
}

/// The activation the module's attributes name, if any.
fn activation_from_attrs(c: &ModuleContents, path: &Path) -> Result<Option<Activation>> {
    let Some(AttrValue::Str(name)) = c.attrs.get("activation") else {
        return Ok(None);
    };
    let kind: ActivationKind = parse_kind(name).ok_or_else(|| {
        user(format!(
            "{}: attribute activation = {name:?} is not an activation this tool supports",
            path.display()
        ))
    })?;
    let k = match c.attrs.get("k") {
        Some(AttrValue::Int(k)) => Some(*k),
        _ => None,
    };
    if kind.uses_k() && k.is_none_or(|k| k < 1) {
        bail_user!(
            "{}: activation is {name} but the module has no integer attribute `k` >= 1",
            path.display()
        );
    }
    let act = match (
        Activation::from_config(kind, k),
        c.attrs.get("jumprelu_bandwidth"),
    ) {
        (a, Some(AttrValue::Float(bandwidth))) if a.kind == ActivationKind::Jumprelu => {
            Activation::jumprelu(*bandwidth)
        }
        (a, _) => a,
    };
    let act = act.with_residual_threshold(match c.attrs.get("residual_threshold") {
        Some(AttrValue::Float(t)) => Some(*t),
        _ => None,
    });
    Ok(Some(act))
}

/// Deterministic probe rows (no use of libtorch's global generator): blocks
/// at several scales around the model's input statistics.
fn probe_inputs(d_in: i64, norm: &Normalizer) -> Tensor {
    let rows = 64;
    let mut rng = SplitMix64(0x5AE_5AE);
    let mut blocks = Vec::new();
    for scale in [0.1f64, 1.0, 10.0] {
        let v: Vec<f32> = (0..rows * d_in)
            .map(|_| {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                ((u * 2.0 - 1.0) * 1.7 * scale) as f32
            })
            .collect();
        blocks.push(Tensor::from_slice(&v).reshape([rows, d_in]));
    }
    norm.invert(&Tensor::cat(&blocks, 0))
}

fn close(a: &Tensor, b: &Tensor) -> bool {
    if a.size() != b.size() {
        return false;
    }
    let diff = (a - b).abs().max().double_value(&[]);
    let mag = b.abs().max().double_value(&[]);
    diff <= 1e-4 * (1.0 + mag)
}

/// Candidate activations when the module does not name its own: guided by
/// how many codes per row the module's own `encode` leaves non-zero, and by
/// whether it has a `threshold`.
fn probe_candidates(codes: &Tensor, d_hidden: i64, has_threshold: bool) -> Vec<Activation> {
    if has_threshold {
        return vec![Activation::plain(ActivationKind::Jumprelu)];
    }
    let max_active = codes
        .ne(0.0)
        .sum_dim_intlist(-1, false, Kind::Int64)
        .max()
        .int64_value(&[]);
    let mut c = vec![Activation::plain(ActivationKind::Relu)];
    if max_active >= 1 && max_active < d_hidden {
        c.push(Activation::with_k(ActivationKind::Topk, max_active));
    }
    c.push(Activation::plain(ActivationKind::Sigmoid));
    c
}

fn run_method(m: &tch::CModule, name: &str, x: &Tensor, path: &Path) -> Result<Tensor> {
    m.method_ts(name, &[x]).map_err(|e| {
        user(format!(
            "{}: running the module's {name}() failed: {}",
            path.display(),
            first_line(&e.to_string())
        ))
    })
}

fn str_attr<'a>(c: &'a ModuleContents, name: &str) -> Option<&'a str> {
    match c.attrs.get(name) {
        Some(AttrValue::Str(s)) => Some(s),
        _ => None,
    }
}

fn bool_attr(c: &ModuleContents, name: &str) -> Option<bool> {
    match c.attrs.get(name) {
        Some(AttrValue::Bool(b)) => Some(*b),
        _ => None,
    }
}

/// Normalisation from `{prefix}shift` / `{prefix}scale` tensors, if present.
fn take_norm(
    c: &mut ModuleContents,
    prefix: &str,
    kind_attr: &str,
    width: i64,
    path: &Path,
) -> Result<Option<Normalizer>> {
    let (shift, scale) = (format!("{prefix}shift"), format!("{prefix}scale"));
    if !c.tensors.contains_key(&shift) && !c.tensors.contains_key(&scale) {
        return Ok(None);
    }
    let kind = str_attr(c, kind_attr)
        .and_then(parse_kind)
        .filter(|k| *k != NormalizeKind::None)
        .unwrap_or(NormalizeKind::Standardize);
    Ok(Some(Normalizer {
        kind,
        shift: Some(take_tensor(c, &shift, Some(&[width]), path)?),
        scale: Some(take_tensor(c, &scale, Some(&[width]), path)?),
        whiten: None,
    }))
}

/// Loads a TorchScript SAE (ours or made in Python) as a model on `device`.
pub fn load(path: &Path, device: Device) -> Result<Sae> {
    let mut c = read_module(path)?;
    require_methods(&c, path)?;
    let (parts, declared) = Parts::take(&mut c, path)?;
    // Check (and where needed infer) the architecture against the module's
    // own methods on probe inputs.
    let module = tch::CModule::load_on_device(path, Device::Cpu).map_err(|e| {
        user(format!(
            "{}: cannot load as a TorchScript module: {}",
            path.display(),
            first_line(&e.to_string())
        ))
    })?;
    // Held to the end: probing and the copies onto `device` record no
    // gradients.
    let _guard = tch::no_grad_guard();
    let x = probe_inputs(parts.w.d_in, &parts.norm);
    let codes = run_method(&module, "encode", &x, path)?.to_kind(Kind::Float);
    let (activation, apply_b_dec) = parts.match_encode(&declared, &x, &codes, path)?;
    let out_act =
        parts.match_decode(&module, &declared, (activation, apply_b_dec), &codes, path)?;
    let m = parts.sae(activation, apply_b_dec, out_act);
    if m.w_skip.is_some() {
        // decode(z) leaves the skip term out: check it through forward.
        let got = run_method(&module, "forward", &x, path)?.to_kind(Kind::Float);
        if !close(&m.forward(&x), &got) {
            bail_user!(
                "{}: the module's forward(x) does not match decode(encode(x)) + x @ W_skip.T \
                 (x normalised by norm_shift/norm_scale when present)",
                path.display()
            );
        }
    }
    Ok(super::on_device(m, device))
}

fn require_methods(c: &ModuleContents, path: &Path) -> Result<()> {
    for m in ["encode", "decode"] {
        if !c.methods.iter().any(|x| x == m) {
            bail_user!(
                "{}: TorchScript module has no `{m}` method (it has: {}); \
                 an SAE module needs encode(x) and decode(z)",
                path.display(),
                c.methods.join(", ")
            );
        }
    }
    Ok(())
}

/// A module's weights, shapes checked.
struct ModuleWeights {
    d_in: i64,
    /// `W_enc`'s input width: `d_in`, or the last encoder layer's output.
    width: i64,
    d_hidden: i64,
    d_out: i64,
    enc_layers: Vec<Layer>,
    w_enc: Tensor,
    b_enc: Tensor,
    w_dec: Tensor,
    b_dec: Tensor,
    dec_layers: Vec<Layer>,
    threshold: Option<Tensor>,
    /// Skip models: `[d_out, d_in]`.
    w_skip: Option<Tensor>,
}

impl ModuleWeights {
    /// Shapes: [enc layers] -> W_enc [w, h] -> W_dec [h, m] -> [dec layers].
    fn take(c: &mut ModuleContents, path: &Path) -> Result<ModuleWeights> {
        let first = if c.tensors.contains_key("enc_layers_0_W") {
            "enc_layers_0_W"
        } else {
            "W_enc"
        };
        let d_in = {
            let t = take_tensor(c, first, None, path)?;
            let d = t.size()[0];
            c.tensors.insert(first.into(), (t, true));
            d
        };
        let (enc_layers, width) = take_layers(c, "enc", d_in, path)?;
        let w_enc = take_tensor(c, "W_enc", None, path)?;
        if w_enc.size()[0] != width {
            bail_user!(
                "{}: `W_enc` has shape {:?}, but its input width is {width}",
                path.display(),
                w_enc.size()
            );
        }
        let d_hidden = w_enc.size()[1];
        let b_enc = take_tensor(c, "b_enc", Some(&[d_hidden]), path)?;
        let w_dec = take_tensor(c, "W_dec", None, path)?;
        if w_dec.size()[0] != d_hidden {
            bail_user!(
                "{}: `W_dec` has shape {:?}, expected [{d_hidden}, d_out]",
                path.display(),
                w_dec.size()
            );
        }
        let b_dec = take_tensor(c, "b_dec", Some(&[w_dec.size()[1]]), path)?;
        let (dec_layers, d_out) = take_layers(c, "dec", w_dec.size()[1], path)?;
        let threshold = match c.tensors.contains_key("threshold") {
            true => Some(take_tensor(c, "threshold", Some(&[d_hidden]), path)?),
            false => None,
        };
        let w_skip = match c.tensors.contains_key("W_skip") {
            true => Some(take_tensor(c, "W_skip", Some(&[d_out, d_in]), path)?),
            false => None,
        };
        Ok(ModuleWeights {
            d_in,
            width,
            d_hidden,
            d_out,
            enc_layers,
            w_enc,
            b_enc,
            w_dec,
            b_dec,
            dec_layers,
            threshold,
            w_skip,
        })
    }
}

/// What the module's attributes say of the architecture; `None`: found by
/// probing.
struct Declared {
    activation: Option<Activation>,
    decoder_activation: Option<OutputActivation>,
    apply_b_dec_to_input: Option<bool>,
}

impl Declared {
    fn read(c: &ModuleContents, path: &Path) -> Result<Declared> {
        let decoder_activation = match str_attr(c, "decoder_activation") {
            Some(s) => Some(parse_kind::<OutputActivation>(s).ok_or_else(|| {
                user(format!(
                    "{}: attribute decoder_activation = {s:?} is not supported (none | sigmoid)",
                    path.display()
                ))
            })?),
            None => None,
        };
        Ok(Declared {
            activation: activation_from_attrs(c, path)?,
            decoder_activation,
            apply_b_dec_to_input: bool_attr(c, "apply_b_dec_to_input"),
        })
    }
}

/// Everything about a module that probing does not choose.
struct Parts {
    w: ModuleWeights,
    norm: Normalizer,
    out_norm: Option<Normalizer>,
    tied: bool,
    gate: Option<Gate>,
}

impl Parts {
    /// Takes the weights and reads the attributes, checking they agree.
    fn take(c: &mut ModuleContents, path: &Path) -> Result<(Parts, Declared)> {
        let w = ModuleWeights::take(c, path)?;
        let norm =
            take_norm(c, "norm_", "normalize", w.d_in, path)?.unwrap_or_else(Normalizer::identity);
        let out_norm = match (
            take_norm(c, "out_norm_", "out_normalize", w.d_out, path)?,
            str_attr(c, "out_normalize"),
        ) {
            (Some(n), _) => Some(n),
            (None, Some(_)) => Some(Normalizer::identity()),
            (None, None) => None,
        };
        let deep = !w.enc_layers.is_empty() || !w.dec_layers.is_empty();
        let tied = bool_attr(c, "tied").unwrap_or(false) && !deep && w.d_out == w.d_in;
        let declared = Declared::read(c, path)?;
        let d_hidden = w.d_hidden;
        // Gated: the magnitude path's parameters.
        let gate = match (
            c.tensors.contains_key("r_mag"),
            c.tensors.contains_key("b_mag"),
        ) {
            (true, true) => Some(Gate {
                r_mag: take_tensor(c, "r_mag", Some(&[d_hidden]), path)?,
                b_mag: take_tensor(c, "b_mag", Some(&[d_hidden]), path)?,
            }),
            _ if declared.activation.map(|a| a.kind) == Some(ActivationKind::Gated) => bail_user!(
                "{}: activation gated needs `r_mag` and `b_mag` tensors [{d_hidden}]",
                path.display()
            ),
            _ => None,
        };
        if declared.activation.is_some_and(|a| a.has_threshold()) && w.threshold.is_none() {
            bail_user!(
                "{}: activation {} needs a `threshold` tensor [{d_hidden}]",
                path.display(),
                str_attr(c, "activation").unwrap_or_default()
            );
        }
        let parts = Parts {
            w,
            norm,
            out_norm,
            tied,
            gate,
        };
        Ok((parts, declared))
    }

    /// The model with these weights and the given choices (on the CPU,
    /// sharing the weights).
    fn sae(
        &self,
        activation: Activation,
        apply_b_dec_to_input: bool,
        decoder_activation: OutputActivation,
    ) -> Sae {
        let w = &self.w;
        let copy_layers = |ls: &[Layer]| -> Vec<Layer> {
            ls.iter()
                .map(|l| Layer {
                    w: l.w.shallow_clone(),
                    b: l.b.shallow_clone(),
                })
                .collect()
        };
        Sae {
            spec: ModelSpec {
                d_in: w.d_in,
                d_hidden: w.d_hidden,
                activation,
                decoder_activation,
                apply_b_dec_to_input,
                tied: self.tied,
                rescale_acts_by_decoder_norm: false,
            },
            w_enc: w.w_enc.shallow_clone(),
            b_enc: w.b_enc.shallow_clone(),
            w_dec: (!self.tied).then(|| w.w_dec.shallow_clone()),
            b_dec: w.b_dec.shallow_clone(),
            threshold: w
                .threshold
                .as_ref()
                .filter(|_| activation.has_threshold())
                .map(|t| t.shallow_clone()),
            gate: self
                .gate
                .as_ref()
                .filter(|_| activation.kind == ActivationKind::Gated)
                .map(|g| Gate {
                    r_mag: g.r_mag.shallow_clone(),
                    b_mag: g.b_mag.shallow_clone(),
                }),
            enc_layers: copy_layers(&w.enc_layers),
            dec_layers: copy_layers(&w.dec_layers),
            norm: self.norm.clone(),
            out_norm: self.out_norm.clone(),
            w_skip: w.w_skip.as_ref().map(|t| t.shallow_clone()),
        }
    }

    /// The activation and `apply_b_dec_to_input` (declared, or else the
    /// first candidates) whose encoder reproduces the module's `codes` of
    /// `x`.
    fn match_encode(
        &self,
        declared: &Declared,
        x: &Tensor,
        codes: &Tensor,
        path: &Path,
    ) -> Result<(Activation, bool)> {
        let acts = match declared.activation {
            Some(a) => vec![a],
            None if self.gate.is_some() => vec![Activation::plain(ActivationKind::Gated)],
            None => probe_candidates(codes, self.w.d_hidden, self.w.threshold.is_some()),
        };
        // b_dec can be subtracted from the input only when the widths agree.
        let b_decs = match declared.apply_b_dec_to_input {
            Some(b) => vec![b],
            None if self.w.b_dec.size()[0] == self.w.width => vec![true, false],
            None => vec![false],
        };
        for &a in &acts {
            for &b in &b_decs {
                if close(&self.sae(a, b, OutputActivation::None).encode(x), codes) {
                    return Ok((a, b));
                }
            }
        }
        bail_user!(
            "{}: the module's encode(x) does not match act((x - b_dec) @ W_enc + b_enc) \
             for any supported activation (tried {}); set attributes `activation` \
             (relu | topk | sigmoid | jumprelu | batchtopk | gated), `k` and `apply_b_dec_to_input` \
             on the module, or check its weights",
            path.display(),
            acts.iter()
                .map(|a| kind_name(&a.kind()))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// The decoder output activation (declared, or else the first of none,
    /// sigmoid) that reproduces the module's `decode`, probed with its own
    /// codes and with dense non-negative codes.
    fn match_decode(
        &self,
        module: &tch::CModule,
        declared: &Declared,
        (activation, apply_b_dec): (Activation, bool),
        codes: &Tensor,
        path: &Path,
    ) -> Result<OutputActivation> {
        let outs = match declared.decoder_activation {
            Some(o) => vec![o],
            None => vec![OutputActivation::None, OutputActivation::Sigmoid],
        };
        let dense = (probe_inputs(self.w.d_hidden, &Normalizer::identity()) * 0.3).abs();
        let z = Tensor::cat(&[codes.shallow_clone(), dense], 0);
        let decoded = run_method(module, "decode", &z, path)?.to_kind(Kind::Float);
        let found = outs
            .iter()
            .copied()
            .find(|&o| close(&self.sae(activation, apply_b_dec, o).decode(&z), &decoded));
        match found {
            Some(o) => Ok(o),
            None => bail_user!(
                "{}: the module's decode(z) does not match out_act(z @ W_dec + b_dec) \
                 (un-normalised by norm_shift/norm_scale when present) for out_act in none | sigmoid",
                path.display()
            ),
        }
    }
}
