//! Language models that make training rows from token ids: a TorchScript
//! module or a torch.export AOTInductor package (`.pt2`), each with
//! `forward(ids[int64, B, T]) -> [B, T, d]` (the model up to the layer
//! studied). [`source::ModelSource`] turns one into rows: sequences run in
//! fixed groups, positions dropped by token id or position.

pub mod dump;
pub mod pt2;
pub mod source;
pub mod tokens;
pub mod vocab;

use crate::error::user;
use crate::{bail_user, Result};
use std::path::{Path, PathBuf};
use tch::{Device, IValue, Kind, Tensor};

/// A loaded language model.
pub struct LanguageModel {
    kind: Kind_,
    path: PathBuf,
    pub device: Device,
}

enum Kind_ {
    Script(tch::CModule),
    Pt2(pt2::Pt2Model),
}

impl LanguageModel {
    /// Loads `path`: an AOTInductor package when it ends in `.pt2`, else a
    /// TorchScript file. `key` names the setting in messages.
    pub fn open(path: &Path, device: Device, key: &str) -> Result<LanguageModel> {
        if !path.is_file() {
            bail_user!("{key}: {}: no such file", path.display());
        }
        let pt2 = path.extension().is_some_and(|e| e == "pt2");
        let kind = if pt2 {
            Kind_::Pt2(
                pt2::Pt2Model::load(path, device)
                    .map_err(|e| user(format!("{key}: {}", crate::error::one_line(&e))))?,
            )
        } else {
            let m = tch::CModule::load_on_device(path, device).map_err(|e| {
                user(format!(
                    "{key}: {}: not a TorchScript module ({}); save the model up to the layer \
                     studied with torch.jit.trace(...).save(), or export a .pt2 package",
                    path.display(),
                    first_line(&e.to_string())
                ))
            })?;
            let sae_like = m
                .named_parameters()
                .map(|ps| ps.iter().any(|(n, _)| n == "W_enc" || n == "W_dec"))
                .unwrap_or(false);
            if sae_like {
                bail_user!(
                    "{key}: {} is a sparse autoencoder (it has W_enc/W_dec), not a language model; \
                     give the model up to the layer studied, whose forward(ids) returns \
                     [batch, ctx, d]",
                    path.display()
                );
            }
            Kind_::Script(m)
        };
        Ok(LanguageModel {
            kind,
            path: path.to_owned(),
            device,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `forward(ids)` without gradients: float32 `[B, T, d]` on the model's
    /// device. `what` names the sequences in messages.
    pub fn forward(&self, ids: &Tensor, what: &str) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let ids = ids.to_device(self.device);
        let out = match &self.kind {
            Kind_::Script(m) => match m.forward_is(&[IValue::Tensor(ids.shallow_clone())]) {
                Ok(IValue::Tensor(t)) => t,
                Ok(IValue::Tuple(_)) | Ok(IValue::GenericList(_)) | Ok(IValue::TensorList(_)) => {
                    bail_user!(
                        "{}: forward returns several values; return the [batch, ctx, d] tensor of \
                         the layer studied (e.g. ...hidden_states[layer])",
                        self.path.display()
                    )
                }
                Ok(_) => bail_user!(
                    "{}: forward does not return a tensor; it must return [batch, ctx, d]",
                    self.path.display()
                ),
                Err(e) => return Err(self.forward_error(&e.to_string(), what)),
            },
            Kind_::Pt2(m) => m
                .forward(&ids)
                .map_err(|e| self.forward_error(&crate::error::one_line(&e), what))?,
        };
        let (b, t) = (ids.size()[0], ids.size()[1]);
        match out.size().as_slice() {
            [ob, ot, _] if *ob == b && *ot == t => {}
            s => bail_user!(
                "{}: forward(ids [{b}, {t}]) returned shape {s:?}; expected [{b}, {t}, d] \
                 (the activations of the layer studied)",
                self.path.display()
            ),
        }
        if !matches!(
            out.kind(),
            Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
        ) {
            bail_user!(
                "{}: forward returned {:?} values; expected floating-point activations",
                self.path.display(),
                out.kind()
            );
        }
        Ok(out.to_kind(Kind::Float))
    }

    fn forward_error(&self, msg: &str, what: &str) -> anyhow::Error {
        let line = first_line(msg);
        if msg.contains("forward") && (msg.contains("not defined") || msg.contains("no method")) {
            return user(format!(
                "{}: the module has no forward method; save a module whose forward(ids) returns \
                 [batch, ctx, d]",
                self.path.display()
            ));
        }
        user(format!(
            "{}: forward failed on {what}: {line}",
            self.path.display()
        ))
    }

    /// Whether the model runs on `ctx` copies of token `id` (probes the
    /// embedding's range: an id past it fails the forward).
    pub fn accepts(&self, id: i64, ctx: usize) -> bool {
        let ids = Tensor::full([1, ctx as i64], id, (Kind::Int64, Device::Cpu));
        self.forward(&ids, "a probe").is_ok()
    }

    /// The model's vocabulary size as its forward accepts ids (None when
    /// it accepts every id up to 2^31: no embedding bound to find).
    pub fn vocab_size(&self, ctx: usize) -> Option<i64> {
        if !self.accepts(0, ctx) {
            return Some(0);
        }
        let (mut lo, mut hi) = (0i64, 1i64);
        while self.accepts(hi, ctx) {
            lo = hi;
            hi *= 2;
            if hi > 1 << 31 {
                return None;
            }
        }
        // accepts(lo), not accepts(hi)
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.accepts(mid, ctx) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(hi)
    }
}

fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s).trim()
}
