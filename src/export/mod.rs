//! Model files: what `--model` (and `model.init`) accepts, and the export
//! formats. A model is any of:
//! - a run directory (its `model.safetensors`),
//! - a `.safetensors` file written by this tool ([`safetensors`]),
//! - a TorchScript file: our `model.pt` or a module scripted in Python
//!   ([`torchscript`]),
//! - a SAELens directory: `cfg.json` + `sae_weights.safetensors`
//!   ([`saelens`]).

pub mod saelens;
pub mod safetensors;
pub mod torchscript;

use crate::error::user;
use crate::model::{Gate, Layer, Sae};
use crate::{bail_user, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The weights file inside a run directory.
pub const RUN_MODEL_FILE: &str = "model.safetensors";
/// The TorchScript module inside a run directory.
pub const RUN_TORCHSCRIPT_FILE: &str = "model.pt";

/// A model file and how to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A `.safetensors` file (ours, or bare weights for `model.init`).
    Safetensors(PathBuf),
    TorchScript(PathBuf),
    /// A SAELens directory.
    SaeLens(PathBuf),
}

/// Works out which format `path` is in.
pub fn resolve(path: &Path) -> Result<ModelSource> {
    if path.is_dir() {
        let f = path.join(RUN_MODEL_FILE);
        if f.is_file() {
            return Ok(ModelSource::Safetensors(f));
        }
        if saelens::is_saelens_dir(path) {
            return Ok(ModelSource::SaeLens(path.to_owned()));
        }
        bail_user!(
            "{}: neither a run directory (no {RUN_MODEL_FILE}) nor a SAELens directory \
             ({} + {}); pass a run directory, a .safetensors or TorchScript file, or a SAELens directory",
            path.display(),
            saelens::CFG_FILE,
            saelens::WEIGHTS_FILE
        );
    }
    if !path.exists() {
        return Err(user(format!(
            "{}: no such model file or directory",
            path.display()
        )));
    }
    // SAELens's weights file (or its cfg.json) stands for its directory.
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if let Some(dir) = path.parent() {
        if (name == saelens::WEIGHTS_FILE || name == saelens::CFG_FILE)
            && saelens::is_saelens_dir(dir)
        {
            return Ok(ModelSource::SaeLens(dir.to_owned()));
        }
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        return Ok(ModelSource::Safetensors(path.to_owned()));
    }
    if torchscript::looks_like_torchscript(path) {
        return Ok(ModelSource::TorchScript(path.to_owned()));
    }
    bail_user!(
        "{}: unrecognised model format; expected a run directory, a .safetensors file, \
         a TorchScript file or a SAELens directory",
        path.display()
    )
}

/// Loads a model in any accepted format onto `device`.
pub fn load_model(spec: &str, device: Device) -> Result<Sae> {
    match resolve(Path::new(spec))? {
        ModelSource::Safetensors(f) => safetensors::load(&f, device),
        ModelSource::TorchScript(f) => torchscript::load(&f, device),
        ModelSource::SaeLens(d) => saelens::load(&d, device),
    }
}

/// `m` with every tensor moved to `device`.
fn on_device(m: Sae, device: Device) -> Sae {
    let to = |t: Tensor| t.to_device(device);
    let layers = |ls: Vec<Layer>| -> Vec<Layer> {
        ls.into_iter()
            .map(|l| Layer {
                w: to(l.w),
                b: to(l.b),
            })
            .collect()
    };
    Sae {
        spec: m.spec,
        w_enc: to(m.w_enc),
        b_enc: to(m.b_enc),
        w_dec: m.w_dec.map(to),
        b_dec: to(m.b_dec),
        threshold: m.threshold.map(to),
        gate: m.gate.map(|g| Gate {
            r_mag: to(g.r_mag),
            b_mag: to(g.b_mag),
        }),
        enc_layers: layers(m.enc_layers),
        dec_layers: layers(m.dec_layers),
        norm: m.norm.to_device(device),
        out_norm: m.out_norm.map(|n| n.to_device(device)),
        w_skip: m.w_skip.map(to),
    }
}

/// `W_enc [d_in, d_hidden]`, `b_enc`, `W_dec [d_hidden, d_in]`, `b_dec`, on
/// the CPU as float32.
pub struct Weights {
    pub w_enc: Tensor,
    pub b_enc: Tensor,
    pub w_dec: Tensor,
    pub b_dec: Tensor,
    /// The architecture's other tensors by their saved names (`threshold`
    /// `[d_hidden]`, gated's `r_mag` and `b_mag`), where the source has them.
    pub extra: Vec<(String, Tensor)>,
    /// A skip model's `W_skip [d_out, d_in]`, where the source has one.
    pub w_skip: Option<Tensor>,
}

/// Tensors besides the four that `model.init` carries over.
pub const EXTRA_INIT_TENSORS: [&str; 3] = ["threshold", "r_mag", "b_mag"];

/// Weights to start training from (`model.init`): any `--model` format, or
/// a bare `.safetensors` holding just the four SAELens-named tensors. Models
/// that normalise their input give their weights as stored (they act on
/// normalised input).
pub fn load_weights(spec: &str) -> Result<Weights> {
    let path = Path::new(spec);
    if let ModelSource::Safetensors(f) = resolve(path)? {
        let (mut t, meta) = safetensors::read_all(&f)?;
        if !meta.contains_key("sae") {
            let (d_in, d_h) = match t.get("W_enc") {
                Some(w) if w.dim() == 2 => (w.size()[0], w.size()[1]),
                Some(w) => bail_user!(
                    "{}: tensor `W_enc` has shape {:?}; expected [d_in, d_hidden]",
                    f.display(),
                    w.size()
                ),
                None => bail_user!("{}: tensor `W_enc` is missing", f.display()),
            };
            let mut w = Weights {
                w_enc: safetensors::take(&mut t, "W_enc", &[d_in, d_h], &f)?,
                b_enc: safetensors::take(&mut t, "b_enc", &[d_h], &f)?,
                w_dec: safetensors::take(&mut t, "W_dec", &[d_h, d_in], &f)?,
                b_dec: safetensors::take(&mut t, "b_dec", &[d_in], &f)?,
                extra: Vec::new(),
                w_skip: None,
            };
            if t.contains_key("W_skip") {
                w.w_skip = Some(safetensors::take(&mut t, "W_skip", &[d_in, d_in], &f)?);
            }
            for name in EXTRA_INIT_TENSORS {
                if t.contains_key(name) {
                    let v = safetensors::take(&mut t, name, &[d_h], &f)?;
                    w.extra.push((name.to_string(), v));
                }
            }
            return Ok(w);
        }
    }
    let m = load_model(spec, Device::Cpu)?;
    let f = |t: &Tensor| t.detach().to_kind(Kind::Float);
    let mut extra = Vec::new();
    if let Some(t) = m.threshold_for_saving() {
        extra.push(("threshold".to_string(), t));
    }
    if let Some(g) = &m.gate {
        extra.push(("r_mag".to_string(), f(&g.r_mag)));
        extra.push(("b_mag".to_string(), f(&g.b_mag)));
    }
    Ok(Weights {
        w_enc: f(&m.w_enc),
        b_enc: f(&m.b_enc),
        w_dec: f(&m.decoder_weight()).contiguous(),
        b_dec: f(&m.b_dec),
        extra,
        w_skip: m.w_skip.as_ref().map(f),
    })
}
