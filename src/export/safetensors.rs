//! `model.safetensors`: weights under SAELens names (`W_enc [d_in, d_hidden]`,
//! `b_enc`, `W_dec [d_hidden, d_in]`, `b_dec`), normalisation as `norm_shift`
//! and `norm_scale`, and the architecture as JSON in the header metadata
//! (key `sae`), so the file alone is a complete model.

use crate::activation::Activation;
use crate::config::{ActivationKind, NormalizeKind, OutputActivation};
use crate::error::user;
use crate::model::{ModelSpec, Sae};
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
const FORMAT: &str = "sae-rs/1";

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

/// Serialises named tensors (as float32) with string metadata.
pub fn to_bytes(tensors: &[(&str, Tensor)], metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| to_f32_bytes(t).map(|(s, b)| (n.to_string(), s, b)))
        .collect::<Result<_>>()?;
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    Ok(safetensors::serialize(views, &Some(metadata))?)
}

/// The named tensors of a model, as saved.
pub fn named_tensors(model: &Sae) -> Vec<(&'static str, Tensor)> {
    let mut out = vec![
        ("W_enc", model.w_enc.detach()),
        ("b_enc", model.b_enc.detach()),
        ("W_dec", model.decoder_weight().detach()),
        ("b_dec", model.b_dec.detach()),
    ];
    if let (Some(shift), Some(scale)) = (&model.norm.shift, &model.norm.scale) {
        out.push(("norm_shift", shift.detach()));
        out.push(("norm_scale", scale.detach()));
    }
    out
}

/// Writes the model atomically.
pub fn save(model: &Sae, path: &Path) -> Result<()> {
    let meta = HashMap::from([(
        META_KEY.to_string(),
        serde_json::to_string(&Architecture::of(model))?,
    )]);
    let bytes = to_bytes(&named_tensors(model), meta)?;
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
    let (mut tensors, meta) = read_all(path)?;
    let arch: Architecture = match meta.get(META_KEY) {
        Some(json) => serde_json::from_str(json).map_err(|e| {
            user(format!(
                "{}: unreadable `{META_KEY}` metadata: {e}",
                path.display()
            ))
        })?,
        None => bail_user!(
            "{}: no `{META_KEY}` metadata: not a model written by this tool \
             (to start from bare weights use model.init in a training config)",
            path.display()
        ),
    };
    let spec = ModelSpec {
        d_in: arch.d_in,
        d_hidden: arch.d_hidden,
        activation: Activation::from_config(arch.activation, arch.k),
        decoder_activation: arch.decoder_activation,
        apply_b_dec_to_input: arch.apply_b_dec_to_input,
        tied: arch.tied,
    };
    let (d, h) = (spec.d_in, spec.d_hidden);
    let w_enc = take(&mut tensors, "W_enc", &[d, h], path)?;
    let b_enc = take(&mut tensors, "b_enc", &[h], path)?;
    let w_dec = take(&mut tensors, "W_dec", &[h, d], path)?;
    let b_dec = take(&mut tensors, "b_dec", &[d], path)?;
    let norm = match arch.normalize {
        NormalizeKind::None => Normalizer::identity(),
        kind => Normalizer {
            kind,
            shift: Some(take(&mut tensors, "norm_shift", &[d], path)?),
            scale: Some(take(&mut tensors, "norm_scale", &[d], path)?),
        },
    };
    Ok(Sae {
        spec,
        w_enc: w_enc.to_device(device),
        b_enc: b_enc.to_device(device),
        w_dec: (!spec.tied).then(|| w_dec.to_device(device)),
        b_dec: b_dec.to_device(device),
        norm: norm.to_device(device),
    })
}
