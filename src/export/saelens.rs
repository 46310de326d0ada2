//! SAELens directories: `cfg.json` + `sae_weights.safetensors`, as
//! `sae_lens` 6.x `SAE.save_model` writes them, so
//! `sae_lens.SAE.load_from_disk(DIR)` loads our export and we load theirs.
//!
//! Architectures, both ways: `standard` (ReLU), `topk`, `jumprelu`
//! (`threshold` per latent). Our `batchtopk` exports as `jumprelu` with the
//! threshold estimated in training, as sae_lens saves BatchTopK SAEs for
//! inference; a sae_lens `batchtopk` training save (`topk_threshold`) reads
//! as our batchtopk. SAELens has no sigmoid activation or decoder output, no
//! deep (`model.hidden`) SAEs: those are refused with the reason.
//! Transcoders (`data.target`) are written and read as SAELens's
//! `transcoder` (ReLU) and `jumprelu_transcoder` (JumpReLU or batchtopk). Skip models
//! (`model.skip_connection`), transcoders or not, are written and read as
//! `skip_transcoder` and `jumprelu_skip_transcoder` (`W_skip [d_out, d_in]`;
//! a plain SAE's `b_dec` on the input is folded into `b_enc`, since SAELens
//! transcoders never subtract it). SAELens has no per-feature input
//! normalisation either; ours is affine, so it is folded into the weights
//! exactly (see [`fold_normalization`]). Reading a `topk` SAE trained with
//! `rescale_acts_by_decoder_norm` folds the decoder norms into the weights
//! (exact, as SAELens's own `fold_W_dec_norm`).
//!
//! To add an architecture: its `Architecture::saelens` (export, in
//! `src/arch/`) and an arm in `activation_from_cfg` (import).

use super::safetensors::{read_all, take};
use crate::arch::{Activation, ActivationKind};
use crate::config::OutputActivation;
use crate::error::user;
use crate::model::{Gate, ModelSpec, Sae};
use crate::normalize::Normalizer;
use crate::{bail_user, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const CFG_FILE: &str = "cfg.json";
pub const WEIGHTS_FILE: &str = "sae_weights.safetensors";
/// The `sae_lens_version` we write: the format generation we follow (6.x
/// reads configs at or above 6.0.0 as-is).
const SAELENS_FORMAT_VERSION: &str = "6.0.0";

/// Whether `dir` holds a SAELens SAE.
pub fn is_saelens_dir(dir: &Path) -> bool {
    dir.join(CFG_FILE).is_file() && dir.join(WEIGHTS_FILE).is_file()
}

/// The SAELens architecture name and its extra config fields for our
/// activation, or why there is none.
fn architecture_of(
    act: &Activation,
) -> std::result::Result<(&'static str, Map<String, Value>), String> {
    act.arch().saelens()
}

/// `cfg.json` in sae_lens's field order (`SAEConfig.to_dict()`).
#[derive(Serialize)]
struct CfgOut {
    d_in: i64,
    d_sae: i64,
    dtype: &'static str,
    device: &'static str,
    apply_b_dec_to_input: bool,
    normalize_activations: &'static str,
    reshape_activations: &'static str,
    metadata: Map<String, Value>,
    #[serde(flatten)]
    arch_fields: Map<String, Value>,
    architecture: &'static str,
}

/// Weights with the normalisations folded in, so that on raw x the folded
/// SAE gives the same codes and the un-normalised output. The input's
/// `x_n = (x - s) / c` and the output's `y = y_n * c' + s'` (the input's
/// own for an SAE, `data.target`'s for a transcoder):
/// - `W_enc' = diag(1/c) W_enc`
/// - `W_dec' = W_dec diag(c')`, `b_dec' = b_dec * c' + s'`
/// - `b_enc' = b_enc` when `b_dec` is subtracted from the input (an SAE, so
///   c' = c and s' = s), since `(x - s)/c - b_dec = (x - b_dec')/c`;
///   otherwise `b_enc - s @ W_enc'`.
///
/// Returns (W_enc, b_enc, W_dec, b_dec).
pub fn fold_normalization(model: &Sae) -> (Tensor, Tensor, Tensor, Tensor) {
    let f = |t: &Tensor| t.detach().to_kind(Kind::Float);
    let (mut w_enc, mut b_enc) = (f(&model.w_enc), f(&model.b_enc));
    let (mut w_dec, mut b_dec) = (f(&model.decoder_weight()).contiguous(), f(&model.b_dec));
    // Per-feature statistics; a scalar scale broadcasts the same way.
    let stats = |n: &Normalizer, d: i64| {
        let (Some(s), Some(c)) = (&n.shift, &n.scale) else {
            return None;
        };
        let full = |t: &Tensor| t.to_kind(Kind::Float).broadcast_to([d]).contiguous();
        Some((full(s), full(c)))
    };
    if let Some((s, c)) = stats(&model.norm, model.spec.d_in) {
        w_enc = &w_enc / c.unsqueeze(1);
        if !model.spec.apply_b_dec_to_input {
            // Not `-=`: b_enc may share storage with the model's parameter.
            b_enc = &b_enc - s.matmul(&w_enc);
        }
    }
    if let Some((s, c)) = stats(model.output_norm(), model.d_out()) {
        w_dec = &w_dec * c.unsqueeze(0);
        b_dec = &b_dec * &c + &s;
    }
    (w_enc, b_enc, w_dec, b_dec)
}

/// A skip model's `W_skip` on raw input and the shift of `b_dec` that
/// goes with it, folded as in [`fold_normalization`]: the term
/// `x_n @ W_skip.T` in the output's normalised space is, on raw x,
/// `x @ W_skip'.T - s @ W_skip'.T` with `W_skip' = diag(c') W_skip diag(1/c)`.
/// Returns (W_skip', s @ W_skip'.T), the second to subtract from `b_dec`.
fn fold_skip(model: &Sae, w_skip: &Tensor) -> (Tensor, Option<Tensor>) {
    let mut w = w_skip.detach().to_kind(Kind::Float);
    let stats = |n: &Normalizer, d: i64| {
        let (Some(s), Some(c)) = (&n.shift, &n.scale) else {
            return None;
        };
        let full = |t: &Tensor| t.to_kind(Kind::Float).broadcast_to([d]).contiguous();
        Some((full(s), full(c)))
    };
    if let Some((_, c)) = stats(model.output_norm(), model.d_out()) {
        w = &w * c.unsqueeze(1);
    }
    match stats(&model.norm, model.spec.d_in) {
        Some((s, c)) => {
            let w = &w / c.unsqueeze(0);
            let shift = s.matmul(&w.tr());
            (w, Some(shift))
        }
        None => (w, None),
    }
}

/// Writes `model` as a SAELens directory `dir` (created if missing).
pub fn save(model: &Sae, dir: &Path) -> Result<()> {
    let (architecture, arch_fields) = saelens_architecture(model)?;
    let (w_enc, mut b_enc, w_dec, mut b_dec) = fold_normalization(model);
    let mut apply_b_dec_to_input = model.spec.apply_b_dec_to_input;
    let w_skip = model.w_skip.as_ref().map(|w| {
        // SAELens transcoders read x itself: `(x - b_dec) @ W_enc + b_enc`
        // is `x @ W_enc + (b_enc - b_dec @ W_enc)`.
        if apply_b_dec_to_input {
            b_enc = &b_enc - b_dec.matmul(&w_enc);
            apply_b_dec_to_input = false;
        }
        let (w, shift) = fold_skip(model, w);
        if let Some(shift) = shift {
            b_dec = &b_dec - shift;
        }
        w
    });
    let cfg = CfgOut {
        d_in: model.spec.d_in,
        d_sae: model.spec.d_hidden,
        dtype: "float32",
        device: "cpu",
        apply_b_dec_to_input,
        normalize_activations: "none",
        reshape_activations: "none",
        metadata: export_metadata(model)?,
        arch_fields,
        architecture,
    };
    let cfg_json = serde_json::to_string(&cfg)?;
    // sae_lens writes state_dict order with no safetensors metadata.
    let mut tensors = match &model.gate {
        // Gated: the gate's bias is `b_gate`; the fold shifts the magnitude
        // bias by the same amount times exp(r_mag) (sae_lens's own rule).
        Some(g) => {
            let shift = model.b_enc.detach().to_kind(Kind::Float) - &b_enc;
            let r_mag = g.r_mag.detach().to_kind(Kind::Float);
            let b_mag = g.b_mag.detach().to_kind(Kind::Float) - shift * r_mag.exp();
            vec![
                ("W_enc", w_enc),
                ("b_gate", b_enc),
                ("r_mag", r_mag),
                ("b_mag", b_mag),
                ("W_dec", w_dec),
                ("b_dec", b_dec),
            ]
        }
        // Matching pursuit: SAELens's is tied, with W_dec and b_dec only.
        None if is_pursuit(model) => vec![("W_dec", w_dec), ("b_dec", b_dec)],
        None => vec![
            ("W_enc", w_enc),
            ("b_enc", b_enc),
            ("W_dec", w_dec),
            ("b_dec", b_dec),
        ],
    };
    // Thresholds act on pre-activations, which the fold leaves unchanged.
    if let Some(t) = model.threshold_for_saving() {
        tensors.push(("threshold", t));
    }
    if let Some(w) = w_skip {
        tensors.push(("W_skip", w));
    }
    let weights = super::safetensors::to_bytes(&tensors, None)?;
    write_dir(
        dir,
        &[(CFG_FILE, cfg_json.as_bytes()), (WEIGHTS_FILE, &weights)],
    )
}

fn is_pursuit(model: &Sae) -> bool {
    model.spec.activation.kind == ActivationKind::MatchingPursuit
}

/// The SAELens architecture of `model` and its extra config fields, or why
/// SAELens cannot hold it.
fn saelens_architecture(model: &Sae) -> Result<(&'static str, Map<String, Value>)> {
    let (architecture, arch_fields) = architecture_of(&model.spec.activation).map_err(|why| {
        user(format!(
            "cannot export to SAELens: {why}; export as torchscript or safetensors instead"
        ))
    })?;
    if model.is_deep() {
        bail_user!(
            "cannot export to SAELens: the model has hidden layers (model.hidden) and SAELens \
             SAEs have one encoder and one decoder layer; export as torchscript or safetensors instead"
        );
    }
    let (architecture, arch_fields) = if model.w_skip.is_some() {
        // SAELens's skip transcoders: ReLU or JumpReLU; a plain SAE with a
        // skip term is one whose d_out is d_in.
        let name = match architecture {
            "standard" => "skip_transcoder",
            "jumprelu" => "jumprelu_skip_transcoder",
            _ => bail_user!(
                "cannot export to SAELens: SAELens skip transcoders are ReLU \
                 (`skip_transcoder`) or JumpReLU (`jumprelu_skip_transcoder`, also for \
                 batchtopk), and this one is {}; export as torchscript or safetensors instead",
                crate::config::activation_name(model.spec.activation.kind())
            ),
        };
        let mut fields = Map::new();
        fields.insert("d_out".into(), json!(model.d_out()));
        fields.extend(arch_fields);
        (name, fields)
    } else if model.is_transcoder() {
        // SAELens's transcoders: ReLU (`transcoder`) or JumpReLU, with
        // d_out and no b_dec on the input.
        let name = match architecture {
            "standard" => "transcoder",
            "jumprelu" => "jumprelu_transcoder",
            _ => bail_user!(
                "cannot export to SAELens: SAELens transcoders are ReLU (`transcoder`) or \
                 JumpReLU (`jumprelu_transcoder`), and this one is {}; export as torchscript \
                 or safetensors instead",
                crate::config::activation_name(model.spec.activation.kind())
            ),
        };
        let mut fields = Map::new();
        fields.insert("d_out".into(), json!(model.d_out()));
        fields.extend(arch_fields);
        (name, fields)
    } else {
        (architecture, arch_fields)
    };
    if model.spec.decoder_activation != OutputActivation::None {
        bail_user!(
            "cannot export to SAELens: the decoder output activation is sigmoid and SAELens \
             decoders are linear; export as torchscript or safetensors instead"
        );
    }
    if is_pursuit(model) && model.norm.shift.is_some() {
        bail_user!(
            "cannot export to SAELens: a matching_pursuit model's codes depend on its \
             decoder rows' norms, which folding the input normalisation (data.normalize) \
             would change; export as torchscript or safetensors instead"
        );
    }
    Ok((architecture, arch_fields))
}

/// `cfg.json`'s `metadata`: the format version, who exported it and which
/// normalisations were folded into the weights.
fn export_metadata(model: &Sae) -> Result<Map<String, Value>> {
    let mut metadata = Map::new();
    metadata.insert("sae_lens_version".into(), json!(SAELENS_FORMAT_VERSION));
    metadata.insert("sae_lens_training_version".into(), Value::Null);
    metadata.insert(
        "exported_by".into(),
        json!(format!("sae {}", env!("CARGO_PKG_VERSION"))),
    );
    if model.norm.shift.is_some() {
        metadata.insert(
            "folded_input_normalization".into(),
            serde_json::to_value(model.norm.kind)?,
        );
    }
    if let Some(n) = model.out_norm.as_ref().filter(|n| n.shift.is_some()) {
        metadata.insert(
            "folded_output_normalization".into(),
            serde_json::to_value(n.kind)?,
        );
    }
    Ok(metadata)
}

/// Writes files into `dir`. A new directory is built under a temporary name
/// and renamed into place; in an existing directory each file is replaced
/// atomically.
fn write_dir(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            bail_user!("--out {}: exists and is not a directory", dir.display());
        }
        for (name, bytes) in files {
            crate::fsutil::write_bytes_atomic(&dir.join(name), bytes)?;
        }
        return Ok(());
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp: PathBuf = dir.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp)
            .map_err(|e| user(format!("cannot create {}: {e}", dir.display())))?;
        for (name, bytes) in files {
            crate::fsutil::write_bytes_atomic(&tmp.join(name), bytes)?;
        }
        std::fs::rename(&tmp, dir)
            .map_err(|e| anyhow::anyhow!("renaming into {}: {e}", dir.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// The fields of `cfg.json` we read; pre-6.0 names included.
#[derive(Deserialize)]
struct CfgIn {
    architecture: Option<String>,
    d_in: i64,
    d_sae: i64,
    apply_b_dec_to_input: Option<bool>,
    normalize_activations: Option<Value>,
    reshape_activations: Option<String>,
    k: Option<i64>,
    rescale_acts_by_decoder_norm: Option<bool>,
    /// Pre-6.0 configs name the activation here.
    #[serde(alias = "activation_fn_str")]
    activation_fn: Option<String>,
    activation_fn_kwargs: Option<Value>,
    /// matching_pursuit (`max_iterations` null: d_in, as SAELens).
    residual_threshold: Option<f64>,
    max_iterations: Option<i64>,
    stop_on_duplicate_support: Option<bool>,
    /// Transcoders: the output width.
    d_out: Option<i64>,
}

/// How a SAELens architecture maps onto ours.
struct Imported {
    activation: Activation,
    /// Codes are computed with decoder-norm rescaling (folded on load).
    fold_dec_norm: bool,
    /// The tensor holding the per-latent threshold (`threshold`), or a
    /// scalar one (`topk_threshold` of a batchtopk training save).
    threshold: Option<&'static str>,
}

/// Our activation for a SAELens architecture.
fn activation_from_cfg(cfg: &CfgIn, origin: &str) -> Result<Imported> {
    let pre6_topk_k = cfg
        .activation_fn_kwargs
        .as_ref()
        .and_then(|v| v.get("k"))
        .and_then(Value::as_i64);
    let arch = match (&cfg.architecture, cfg.activation_fn.as_deref()) {
        (Some(a), _) => a.as_str(),
        (None, Some("topk")) => "topk",
        (None, _) => "standard",
    };
    match arch {
        "standard" => {
            if let Some(f) = cfg.activation_fn.as_deref().filter(|f| *f != "relu") {
                bail_user!(
                    "{origin}: activation_fn {f:?} is not supported (only relu for `standard`)"
                );
            }
            Ok(Imported {
                activation: Activation::plain(ActivationKind::Relu),
                fold_dec_norm: false,
                threshold: None,
            })
        }
        "topk" => {
            let k = cfg.k.or(pre6_topk_k).unwrap_or(100); // sae_lens's default
            if k < 1 || k > cfg.d_sae {
                bail_user!("{origin}: k = {k} must be in 1..=d_sae ({})", cfg.d_sae);
            }
            Ok(Imported {
                activation: Activation::with_k(ActivationKind::Topk, k),
                fold_dec_norm: cfg.rescale_acts_by_decoder_norm.unwrap_or(false),
                threshold: None,
            })
        }
        "abstopk" => {
            let k = cfg.k.unwrap_or(100); // sae_lens's default
            if k < 1 || k > cfg.d_sae {
                bail_user!("{origin}: k = {k} must be in 1..=d_sae ({})", cfg.d_sae);
            }
            Ok(Imported {
                activation: Activation::with_k(ActivationKind::Abstopk, k),
                fold_dec_norm: cfg.rescale_acts_by_decoder_norm.unwrap_or(false),
                threshold: None,
            })
        }
        // Transcoders: the same encoders, decoding into d_out columns.
        "transcoder" | "skip_transcoder" => Ok(Imported {
            activation: Activation::plain(ActivationKind::Relu),
            fold_dec_norm: false,
            threshold: None,
        }),
        "jumprelu" | "jumprelu_transcoder" | "jumprelu_skip_transcoder" => Ok(Imported {
            activation: Activation::plain(ActivationKind::Jumprelu),
            fold_dec_norm: false,
            threshold: Some("threshold"),
        }),
        // A training save (sae_lens saves batchtopk for inference as jumprelu).
        "batchtopk" => batchtopk_from_cfg(cfg, origin),
        "gated" => Ok(Imported {
            activation: Activation::plain(ActivationKind::Gated),
            fold_dec_norm: false,
            threshold: None,
        }),
        "matching_pursuit" => matching_pursuit_from_cfg(cfg, origin),
        other => bail_user!(
            "{origin}: architecture `{other}` is not supported \
             (supported: standard, topk, abstopk, jumprelu, batchtopk, gated, matching_pursuit, \
             transcoder, jumprelu_transcoder, skip_transcoder, jumprelu_skip_transcoder)"
        ),
    }
}

/// A sae_lens `batchtopk` training save: `k` and the scalar threshold it
/// estimated (`topk_threshold`).
fn batchtopk_from_cfg(cfg: &CfgIn, origin: &str) -> Result<Imported> {
    let k = cfg.k.unwrap_or(100);
    if k < 1 {
        bail_user!("{origin}: k = {k} must be at least 1");
    }
    if cfg.rescale_acts_by_decoder_norm.unwrap_or(false) {
        bail_user!(
            "{origin}: a batchtopk training save with rescale_acts_by_decoder_norm is not \
             supported; save it for inference in sae_lens first (it becomes jumprelu)"
        );
    }
    Ok(Imported {
        activation: Activation::with_k(ActivationKind::Batchtopk, k),
        fold_dec_norm: false,
        threshold: Some("topk_threshold"),
    })
}

/// A `matching_pursuit` SAE, refusing options whose behaviour ours lacks.
fn matching_pursuit_from_cfg(cfg: &CfgIn, origin: &str) -> Result<Imported> {
    let k = cfg.max_iterations.unwrap_or(cfg.d_in);
    if k < 1 {
        bail_user!("{origin}: max_iterations = {k} must be at least 1");
    }
    if cfg.stop_on_duplicate_support == Some(false) {
        bail_user!(
            "{origin}: stop_on_duplicate_support = false is not supported \
             (matching pursuit here always stops on a repeated support)"
        );
    }
    if cfg.apply_b_dec_to_input == Some(false) {
        bail_user!(
            "{origin}: a matching_pursuit SAE with apply_b_dec_to_input = false is \
             not supported (its decoder then leaves b_dec out)"
        );
    }
    Ok(Imported {
        activation: Activation::matching_pursuit(
            k,
            cfg.residual_threshold
                .unwrap_or(crate::arch::DEFAULT_RESIDUAL_THRESHOLD),
        ),
        fold_dec_norm: false,
        threshold: None,
    })
}

/// Loads a SAELens directory as a model on `device`.
pub fn load(dir: &Path, device: Device) -> Result<Sae> {
    let cfg_path = dir.join(CFG_FILE);
    let origin = cfg_path.display().to_string();
    let cfg = read_cfg(&cfg_path, &origin)?;
    let imported = activation_from_cfg(&cfg, &origin)?;

    let weights = dir.join(WEIGHTS_FILE);
    let (mut t, _) = read_all(&weights)?;
    let (d, h) = (cfg.d_in, cfg.d_sae);
    if imported.activation.kind == ActivationKind::MatchingPursuit {
        let model = tied_pursuit(t, imported.activation, d, h, &weights)?;
        return Ok(super::on_device(model, device));
    }
    let mut w_enc = take(&mut t, "W_enc", &[d, h], &weights)?;
    let gated = imported.activation.kind == ActivationKind::Gated;
    let mut b_enc = take(
        &mut t,
        if gated { "b_gate" } else { "b_enc" },
        &[h],
        &weights,
    )?;
    let gate = if gated {
        Some(Gate {
            r_mag: take(&mut t, "r_mag", &[h], &weights)?,
            b_mag: take(&mut t, "b_mag", &[h], &weights)?,
        })
    } else {
        None
    };
    let transcoder = cfg
        .architecture
        .as_deref()
        .is_some_and(|a| a.ends_with("transcoder"));
    let d_out = d_out_of(&cfg, transcoder, &origin)?;
    let mut w_dec = take(&mut t, "W_dec", &[h, d_out], &weights)?;
    let b_dec = take(&mut t, "b_dec", &[d_out], &weights)?;
    let threshold = match imported.threshold {
        Some(name) => Some(take_threshold(&mut t, name, h, &weights)?),
        None => None,
    };
    let skip = cfg
        .architecture
        .as_deref()
        .is_some_and(|a| a.ends_with("skip_transcoder"));
    let w_skip = match skip {
        true => Some(take(&mut t, "W_skip", &[d_out, d], &weights)?),
        false => None,
    };
    check_no_other_tensors(t, &weights)?;
    if imported.fold_dec_norm {
        // sae_lens: codes = topk(pre * |W_dec_j|), decode (codes / |W_dec_j|) @ W_dec.
        let norms = w_dec.norm_scalaropt_dim(2, [1], false).clamp_min(1e-8);
        w_enc = &w_enc * norms.unsqueeze(0);
        b_enc = &b_enc * &norms;
        w_dec = &w_dec / norms.unsqueeze(1);
    }
    let spec = ModelSpec {
        d_in: d,
        d_hidden: h,
        activation: imported.activation,
        decoder_activation: OutputActivation::None,
        // SAELens transcoders never subtract b_dec (it has d_out entries).
        apply_b_dec_to_input: !transcoder && cfg.apply_b_dec_to_input.unwrap_or(true),
        tied: false,
        rescale_acts_by_decoder_norm: false,
    };
    let model = Sae {
        spec,
        w_enc,
        b_enc,
        w_dec: Some(w_dec),
        b_dec,
        threshold,
        gate,
        enc_layers: Vec::new(),
        dec_layers: Vec::new(),
        norm: Normalizer::identity(),
        // An identity output normalisation marks a transcoder whose d_out
        // happens to equal d_in (it reconstructs another array).
        out_norm: transcoder.then(Normalizer::identity),
        w_skip,
    };
    Ok(super::on_device(model, device))
}

/// A SAELens matching-pursuit SAE from its tensors `t`: tied, with W_dec
/// and b_dec only (W_enc is W_dec.T, no encoder bias).
fn tied_pursuit(
    mut t: HashMap<String, Tensor>,
    activation: Activation,
    d: i64,
    h: i64,
    weights: &Path,
) -> Result<Sae> {
    let w_dec = take(&mut t, "W_dec", &[h, d], weights)?;
    let b_dec = take(&mut t, "b_dec", &[d], weights)?;
    check_no_other_tensors(t, weights)?;
    Ok(Sae {
        spec: ModelSpec {
            d_in: d,
            d_hidden: h,
            activation,
            decoder_activation: OutputActivation::None,
            apply_b_dec_to_input: true,
            tied: true,
            rescale_acts_by_decoder_norm: false,
        },
        w_enc: w_dec.tr().contiguous(),
        b_enc: Tensor::zeros([h], (Kind::Float, Device::Cpu)),
        w_dec: None,
        b_dec,
        threshold: None,
        gate: None,
        enc_layers: Vec::new(),
        dec_layers: Vec::new(),
        norm: Normalizer::identity(),
        out_norm: None,
        w_skip: None,
    })
}

/// The decoder's output width: `d_out` for a transcoder (required,
/// positive), else `d_in`.
fn d_out_of(cfg: &CfgIn, transcoder: bool, origin: &str) -> Result<i64> {
    Ok(match cfg.d_out {
        Some(o) if transcoder && o >= 1 => o,
        Some(o) if transcoder => bail_user!("{origin}: d_out = {o} must be positive"),
        None if transcoder => bail_user!("{origin}: a transcoder needs d_out"),
        _ => cfg.d_in,
    })
}

/// Reads `cfg.json`, refusing options whose effect is not in the files.
fn read_cfg(cfg_path: &Path, origin: &str) -> Result<CfgIn> {
    let text = std::fs::read_to_string(cfg_path)
        .map_err(|e| user(format!("{origin}: cannot read: {e}")))?;
    let cfg: CfgIn = serde_json::from_str(&text)
        .map_err(|e| user(format!("{origin}: not a SAELens config: {e}")))?;
    if cfg.d_in < 1 || cfg.d_sae < 1 {
        bail_user!("{origin}: d_in and d_sae must be positive");
    }
    match &cfg.normalize_activations {
        None | Some(Value::Bool(false)) => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(other) => bail_user!(
            "{origin}: normalize_activations = {other} is not supported: it needs statistics \
             that are not in the saved files (fold it into the weights in sae_lens first, \
             e.g. fold_activation_norm_scaling_factor)"
        ),
    }
    match cfg.reshape_activations.as_deref() {
        // hook_z only reshapes [.., heads, d_head] to [.., d_in]; our rows are flat.
        None | Some("none") | Some("hook_z") => {}
        Some(other) => bail_user!("{origin}: reshape_activations = {other:?} is not supported"),
    }
    Ok(cfg)
}

/// The threshold tensor `name`, per latent (`[h]`) or one for all
/// (a scalar, expanded to `[h]`).
fn take_threshold(
    t: &mut HashMap<String, Tensor>,
    name: &str,
    h: i64,
    weights: &Path,
) -> Result<Tensor> {
    let th = t.remove(name).ok_or_else(|| {
        user(format!(
            "{}: tensor `{name}` is missing (architecture needs it)",
            weights.display()
        ))
    })?;
    if th.numel() != 1 && th.size() != [h] {
        bail_user!(
            "{}: tensor `{name}` has shape {:?}, expected [{h}]",
            weights.display(),
            th.size()
        );
    }
    Ok(th.to_kind(Kind::Float).expand([h], false).contiguous())
}

/// Refuses tensors left over once the architecture's are taken.
fn check_no_other_tensors(mut t: HashMap<String, Tensor>, weights: &Path) -> Result<()> {
    // Older saves carry an all-ones `scaling_factor` that sae_lens drops too.
    if let Some(sf) = t.remove("scaling_factor") {
        if sf.ne(1.0).any().int64_value(&[]) != 0 {
            bail_user!(
                "{}: `scaling_factor` (finetuning scaling) is not all ones; not supported",
                weights.display()
            );
        }
    }
    if !t.is_empty() {
        let mut extra: Vec<String> = t.into_keys().collect();
        extra.sort();
        bail_user!(
            "{}: unexpected tensors {} (expected W_enc, b_enc, W_dec, b_dec and a threshold \
             for jumprelu)",
            weights.display(),
            extra.join(", ")
        );
    }
    Ok(())
}
