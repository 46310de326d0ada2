//! `model.safetensors`: weights under SAELens names (`W_enc [d_in, d_hidden]`,
//! `b_enc`, `W_dec [d_hidden, d_in]`, `b_dec`), normalisation as `norm_shift`
//! and `norm_scale`, and the architecture as JSON in the header metadata
//! (key `sae`), so the file alone is a complete model. Skip models
//! (`model.skip_connection`) add `W_skip [d_out, d_in]`.

use crate::arch::Activation;
use crate::config::{ActivationKind, NormalizeKind, OutputActivation};
use crate::error::user;
use crate::model::{Gate, Layer, ModelSpec, Sae};
use crate::normalize::Normalizer;
use crate::{bail_user, Result};
use anyhow::Context;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Metadata key holding [`Architecture`] as JSON.
const META_KEY: &str = "sae";
/// The `format` value of [`Architecture`], also stored in TorchScript exports.
pub const FORMAT: &str = "sae-rs/1";

/// The serialised form of a [`ModelSpec`] plus normalisation kind.
#[derive(Debug, Serialize, Deserialize)]
pub struct Architecture {
    pub format: String,
    pub d_in: i64,
    pub d_hidden: i64,
    pub activation: ActivationKind,
    pub k: Option<i64>,
    pub decoder_activation: OutputActivation,
    pub apply_b_dec_to_input: bool,
    pub tied: bool,
    pub normalize: NormalizeKind,
    /// Transcoders: the output width (absent: `d_in`) and its normalisation
    /// (tensors `out_norm_shift`, `out_norm_scale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_out: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_normalize: Option<NormalizeKind>,
    /// Deep models: `model.hidden` (tensors `enc_layers.{i}.W [in, out]`,
    /// `enc_layers.{i}.b`, `dec_layers.{i}.W`, `dec_layers.{i}.b`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<i64>,
    /// matching_pursuit: its residual threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual_threshold: Option<f64>,
    /// Skip models: tensor `W_skip [d_out, d_in]` (absent: none).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_connection: bool,
}

impl Architecture {
    pub fn of(model: &Sae) -> Architecture {
        let s = &model.spec;
        Architecture {
            format: FORMAT.into(),
            d_in: s.d_in,
            d_hidden: s.d_hidden,
            activation: s.activation.kind(),
            k: s.activation.k(),
            decoder_activation: s.decoder_activation,
            apply_b_dec_to_input: s.apply_b_dec_to_input,
            tied: s.tied,
            normalize: model.norm.kind,
            d_out: (model.d_out() != s.d_in || model.out_norm.is_some()).then(|| model.d_out()),
            out_normalize: model.out_norm.as_ref().map(|n| n.kind),
            hidden: if model.is_deep() {
                let mut h: Vec<i64> = model.enc_layers.iter().map(|l| l.w.size()[1]).collect();
                h.push(s.d_hidden);
                h
            } else {
                Vec::new()
            },
            residual_threshold: s.activation.residual_threshold(),
            skip_connection: model.w_skip.is_some(),
        }
    }
}

fn to_f32_bytes(t: &Tensor) -> Result<(Vec<usize>, Vec<u8>)> {
    let t = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let shape = t.size().iter().map(|&d| d as usize).collect();
    let values = Vec::<f32>::try_from(t.flatten(0, -1)).context("tensor to vec")?;
    Ok((shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()))
}

/// Serialises named tensors (as float32) with optional string metadata.
pub fn to_bytes(
    tensors: &[(&str, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| to_f32_bytes(t).map(|(s, b)| (n.to_string(), s, b)))
        .collect::<Result<_>>()?;
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    Ok(safetensors::serialize(views, &metadata)?)
}

/// The named tensors of a model, as saved.
pub fn named_tensors(model: &Sae) -> Vec<(String, Tensor)> {
    let mut out = vec![
        ("W_enc".to_string(), model.w_enc.detach()),
        ("b_enc".into(), model.b_enc.detach()),
        ("W_dec".into(), model.decoder_weight().detach()),
        ("b_dec".into(), model.b_dec.detach()),
    ];
    if let Some(t) = model.threshold_for_saving() {
        out.push(("threshold".into(), t));
    }
    if let Some(g) = &model.gate {
        out.push(("r_mag".into(), g.r_mag.detach()));
        out.push(("b_mag".into(), g.b_mag.detach()));
    }
    if let (Some(shift), Some(scale)) = (&model.norm.shift, &model.norm.scale) {
        out.push(("norm_shift".into(), shift.detach()));
        out.push(("norm_scale".into(), scale.detach()));
    }
    if let Some(n) = &model.out_norm {
        if let (Some(shift), Some(scale)) = (&n.shift, &n.scale) {
            out.push(("out_norm_shift".into(), shift.detach()));
            out.push(("out_norm_scale".into(), scale.detach()));
        }
    }
    for (side, layers) in [("enc", &model.enc_layers), ("dec", &model.dec_layers)] {
        for (i, l) in layers.iter().enumerate() {
            out.push((format!("{side}_layers.{i}.W"), l.w.detach()));
            out.push((format!("{side}_layers.{i}.b"), l.b.detach()));
        }
    }
    if let Some(w) = &model.w_skip {
        out.push(("W_skip".into(), w.detach()));
    }
    out
}

/// Writes the model atomically.
pub fn save(model: &Sae, path: &Path) -> Result<()> {
    if model.norm.whiten.is_some() || model.out_norm.as_ref().is_some_and(|n| n.whiten.is_some()) {
        // Training folds the whitening before saving ([`Sae::fold_whitening`]).
        anyhow::bail!("internal: a whitened model is saved only once Sae::fold_whitening has run");
    }
    let meta = HashMap::from([(
        META_KEY.to_string(),
        serde_json::to_string(&Architecture::of(model))?,
    )]);
    let named = named_tensors(model);
    let refs: Vec<(&str, Tensor)> = named
        .iter()
        .map(|(n, t)| (n.as_str(), t.shallow_clone()))
        .collect();
    let bytes = to_bytes(&refs, Some(meta))?;
    crate::fsutil::write_bytes_atomic(path, &bytes)
}

/// Reads every tensor of a safetensors file as float32 on the CPU, plus its
/// metadata. Non-float32 dtypes (f16, bf16, f64) are converted.
pub fn read_all(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes =
        std::fs::read(path).map_err(|e| user(format!("{}: cannot read: {e}", path.display())))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        user(format!(
            "{}: not a valid safetensors file: {e}",
            path.display()
        ))
    })?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| user(format!("{}: bad safetensors header: {e}", path.display())))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F64 => Kind::Double,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            other => bail_user!(
                "{}: tensor `{name}` has dtype {other:?}; expected a float type",
                path.display()
            ),
        };
        let t = Tensor::from_data_size(view.data(), &shape, kind).to_kind(Kind::Float);
        out.insert(name, t);
    }
    Ok((out, meta))
}

/// Takes tensor `name` with the expected shape.
pub fn take(
    tensors: &mut HashMap<String, Tensor>,
    name: &str,
    shape: &[i64],
    origin: &Path,
) -> Result<Tensor> {
    let t = tensors
        .remove(name)
        .ok_or_else(|| user(format!("{}: tensor `{name}` is missing", origin.display())))?;
    if t.size() != shape {
        bail_user!(
            "{}: tensor `{name}` has shape {:?}, expected {:?}",
            origin.display(),
            t.size(),
            shape
        );
    }
    Ok(t)
}

/// Loads a model written by [`save`].
pub fn load(path: &Path, device: Device) -> Result<Sae> {
    let (tensors, meta) = read_all(path)?;
    let arch = read_architecture(&meta, path)?;
    let spec = ModelSpec {
        d_in: arch.d_in,
        d_hidden: arch.d_hidden,
        activation: Activation::from_config(arch.activation, arch.k)
            .with_residual_threshold(arch.residual_threshold),
        decoder_activation: arch.decoder_activation,
        apply_b_dec_to_input: arch.apply_b_dec_to_input,
        tied: arch.tied,
        rescale_acts_by_decoder_norm: false,
    };
    let (d, h) = (spec.d_in, spec.d_hidden);
    let d_out = arch.d_out.unwrap_or(d);
    let (chain_in, chain_out) = layer_chains(&arch.hidden, d, d_out);
    let (code_in, code_out) = (*chain_in.last().unwrap(), chain_out[0]);
    let mut f = Stored { tensors, path };
    let enc_layers = f.layers("enc", &chain_in)?;
    let dec_layers = f.layers("dec", &chain_out)?;
    let w_enc = f.take("W_enc", &[code_in, h])?;
    let b_enc = f.take("b_enc", &[h])?;
    let w_dec = f.take("W_dec", &[h, code_out])?;
    let b_dec = f.take("b_dec", &[code_out])?;
    let threshold = if spec.activation.has_threshold() {
        Some(f.take("threshold", &[h])?)
    } else {
        None
    };
    let gate = if spec.activation.kind == ActivationKind::Gated {
        Some(Gate {
            r_mag: f.take("r_mag", &[h])?,
            b_mag: f.take("b_mag", &[h])?,
        })
    } else {
        None
    };
    let w_skip = match arch.skip_connection {
        true => Some(f.take("W_skip", &[d_out, d])?),
        false => None,
    };
    let norm = f.norm(arch.normalize, "norm_", d)?;
    let out_norm = match arch.out_normalize {
        Some(kind) => Some(f.norm(kind, "out_norm_", d_out)?),
        None => None,
    };
    let model = Sae {
        spec,
        w_enc,
        b_enc,
        w_dec: (!spec.tied).then_some(w_dec),
        b_dec,
        threshold,
        gate,
        enc_layers,
        dec_layers,
        norm,
        out_norm,
        w_skip,
    };
    Ok(super::on_device(model, device))
}

/// The [`Architecture`] in a file's metadata.
fn read_architecture(meta: &HashMap<String, String>, path: &Path) -> Result<Architecture> {
    match meta.get(META_KEY) {
        Some(json) => serde_json::from_str(json).map_err(|e| {
            user(format!(
                "{}: unreadable `{META_KEY}` metadata: {e}",
                path.display()
            ))
        }),
        None => bail_user!(
            "{}: no `{META_KEY}` metadata: not a model written by this tool \
             (to start from bare weights use model.init in a training config)",
            path.display()
        ),
    }
}

/// The widths a deep model's layers chain through: from the input to the
/// code, then from the code to the output (`model.hidden` mirrored after
/// the code). `[d_in]` and `[d_out]` for a plain model.
fn layer_chains(hidden: &[i64], d_in: i64, d_out: i64) -> (Vec<i64>, Vec<i64>) {
    let inner: &[i64] = match hidden.len() {
        0 | 1 => &[],
        n => &hidden[..n - 1],
    };
    let mut chain_in = vec![d_in];
    chain_in.extend_from_slice(inner);
    let mut chain_out: Vec<i64> = inner.iter().rev().copied().collect();
    chain_out.push(d_out);
    (chain_in, chain_out)
}

/// A file's tensors, taken one by one with their shapes checked.
struct Stored<'a> {
    tensors: HashMap<String, Tensor>,
    path: &'a Path,
}

impl Stored<'_> {
    fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        take(&mut self.tensors, name, shape, self.path)
    }

    /// Layers `{side}_layers.{i}.W/.b` from each width of `chain` to the next.
    fn layers(&mut self, side: &str, chain: &[i64]) -> Result<Vec<Layer>> {
        chain
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                Ok(Layer {
                    w: self.take(&format!("{side}_layers.{i}.W"), &[w[0], w[1]])?,
                    b: self.take(&format!("{side}_layers.{i}.b"), &[w[1]])?,
                })
            })
            .collect()
    }

    /// Normalisation `kind` from `{prefix}shift` and `{prefix}scale`.
    fn norm(&mut self, kind: NormalizeKind, prefix: &str, width: i64) -> Result<Normalizer> {
        Ok(match kind {
            NormalizeKind::None => Normalizer::identity(),
            NormalizeKind::Whiten => bail_user!(
                "{}: normalize `whiten` in the metadata: a saved model has its whitening \
                 folded into the weights (normalize none), so this file was not written by `sae train`",
                self.path.display()
            ),
            kind => Normalizer {
                kind,
                shift: Some(self.take(&format!("{prefix}shift"), &[width])?),
                scale: Some(self.take(&format!("{prefix}scale"), &[width])?),
                whiten: None,
            },
        })
    }
}
