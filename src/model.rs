//! The sparse autoencoder: a plain struct of tensors with SAELens names and
//! shapes, and `encode` / `decode` / `forward`.
//!
//! `encode(x) = act((norm(x) - b_dec) @ W_enc + b_enc)` (the `b_dec`
//! subtraction is optional), `decode(z) = unnorm(out_act(z @ W_dec + b_dec))`.

use crate::activation::Activation;
use crate::config::{InitScheme, ModelConfig, OutputActivation};
use crate::normalize::Normalizer;
use tch::{Device, Kind, Tensor};

/// Everything about a model that is not a weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelSpec {
    pub d_in: i64,
    pub d_hidden: i64,
    pub activation: Activation,
    pub decoder_activation: OutputActivation,
    pub apply_b_dec_to_input: bool,
    pub tied: bool,
}

impl ModelSpec {
    pub fn from_config(m: &ModelConfig, d_in: i64) -> ModelSpec {
        ModelSpec {
            d_in,
            d_hidden: m.d_hidden,
            activation: Activation::from_config(m.activation, m.k),
            decoder_activation: m.decoder_activation,
            apply_b_dec_to_input: m.apply_b_dec_to_input,
            tied: m.tied,
        }
    }
}

#[derive(Debug)]
pub struct Sae {
    pub spec: ModelSpec,
    /// `[d_in, d_hidden]`
    pub w_enc: Tensor,
    /// `[d_hidden]`
    pub b_enc: Tensor,
    /// `[d_hidden, d_in]`; `None` when tied (then it is `W_enc.T`).
    pub w_dec: Option<Tensor>,
    /// `[d_in]`
    pub b_dec: Tensor,
    pub norm: Normalizer,
}

impl Sae {
    /// Fresh weights on `device`, drawn from libtorch's global generator
    /// (seed it first for reproducible runs).
    pub fn init(spec: ModelSpec, scheme: InitScheme, norm: Normalizer, device: Device) -> Sae {
        let opts = (Kind::Float, device);
        let (d_in, d_h) = (spec.d_in, spec.d_hidden);
        let (w_enc, b_enc, w_dec, b_dec) = match scheme {
            InitScheme::TorchLinear => {
                // nn.Linear(in, out): weight and bias ~ U(-1/sqrt(in), 1/sqrt(in)).
                // Drawn in the order nn.Linear would: encoder weight, encoder
                // bias, decoder weight, decoder bias (weights stored transposed).
                let be = 1.0 / (d_in as f64).sqrt();
                let bd = 1.0 / (d_h as f64).sqrt();
                let w_enc = Tensor::empty([d_h, d_in], opts).uniform_(-be, be).tr();
                let b_enc = Tensor::empty([d_h], opts).uniform_(-be, be);
                let w_dec = Tensor::empty([d_in, d_h], opts).uniform_(-bd, bd).tr();
                let b_dec = Tensor::empty([d_in], opts).uniform_(-bd, bd);
                (w_enc, b_enc, w_dec, b_dec)
            }
            InitScheme::Sae => {
                // Unit-norm random decoder rows; encoder starts as its transpose.
                let w_dec = Tensor::randn([d_h, d_in], opts);
                let w_dec = &w_dec / w_dec.norm_scalaropt_dim(2, [1], true);
                let w_enc = w_dec.tr();
                (
                    w_enc,
                    Tensor::zeros([d_h], opts),
                    w_dec,
                    Tensor::zeros([d_in], opts),
                )
            }
        };
        let w_dec = (!spec.tied).then_some(w_dec);
        Sae {
            spec,
            w_enc: w_enc.contiguous(),
            b_enc,
            w_dec: w_dec.map(|w| w.contiguous()),
            b_dec,
            norm: norm.to_device(device),
        }
    }

    /// The trainable tensors, in a fixed order.
    pub fn parameters(&self) -> Vec<&Tensor> {
        let mut p = vec![&self.w_enc, &self.b_enc];
        if let Some(w) = &self.w_dec {
            p.push(w);
        }
        p.push(&self.b_dec);
        p
    }

    /// The trainable tensors, mutable, in the order of [`Sae::parameters`].
    pub fn parameters_mut(&mut self) -> Vec<&mut Tensor> {
        let mut p = vec![&mut self.w_enc, &mut self.b_enc];
        if let Some(w) = &mut self.w_dec {
            p.push(w);
        }
        p.push(&mut self.b_dec);
        p
    }

    pub fn set_requires_grad(&mut self, on: bool) {
        let set = |t: &mut Tensor| *t = t.detach().set_requires_grad(on);
        set(&mut self.w_enc);
        set(&mut self.b_enc);
        if let Some(w) = &mut self.w_dec {
            set(w);
        }
        set(&mut self.b_dec);
    }

    /// `W_dec [d_hidden, d_in]` (a view of `W_enc.T` when tied).
    pub fn decoder_weight(&self) -> Tensor {
        match &self.w_dec {
            Some(w) => w.shallow_clone(),
            None => self.w_enc.tr(),
        }
    }

    pub fn device(&self) -> Device {
        self.w_enc.device()
    }

    /// Pre-activations of already-normalised input.
    pub fn pre_activations(&self, xn: &Tensor) -> Tensor {
        let x = if self.spec.apply_b_dec_to_input {
            xn - &self.b_dec
        } else {
            xn.shallow_clone()
        };
        x.matmul(&self.w_enc) + &self.b_enc
    }

    /// Codes of already-normalised input.
    pub fn encode_normalized(&self, xn: &Tensor) -> Tensor {
        self.spec.activation.apply(&self.pre_activations(xn))
    }

    /// Reconstruction in the normalised space.
    pub fn decode_normalized(&self, z: &Tensor) -> Tensor {
        let out = z.matmul(&self.decoder_weight()) + &self.b_dec;
        match self.spec.decoder_activation {
            OutputActivation::None => out,
            OutputActivation::Sigmoid => out.sigmoid(),
        }
    }

    pub fn encode(&self, x: &Tensor) -> Tensor {
        self.encode_normalized(&self.norm.apply(x))
    }

    pub fn decode(&self, z: &Tensor) -> Tensor {
        self.norm.invert(&self.decode_normalized(z))
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.decode(&self.encode(x))
    }
}
