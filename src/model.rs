//! The sparse autoencoder: a plain struct of tensors with SAELens names and
//! shapes, and `encode` / `decode` / `forward`.
//!
//! `encode(x) = act((norm(x) - b_dec) @ W_enc + b_enc)` (the `b_dec`
//! subtraction is optional), `decode(z) = unnorm(out_act(z @ W_dec + b_dec))`.
//!
//! Variants on the same struct:
//! - jumprelu / batchtopk models carry a `threshold` (`[d_hidden]`);
//! - gated models carry `r_mag` and `b_mag` (`b_enc` is the gate's bias);
//! - a transcoder (`data.target`) reconstructs another array: `W_dec` is
//!   `[d_hidden, d_out]` and the output has its own normalisation (`out_norm`);
//! - a deep model (`model.hidden`) has extra ReLU layers before `W_enc`
//!   (`enc_layers`) and after `W_dec` (`dec_layers`); `W_enc`/`W_dec` are the
//!   layers into and out of the code;
//! - a skip model (`model.skip_connection`, sparsify's) adds `xn @ W_skip.T`
//!   (`W_skip [d_out, d_in]`, SAELens's shape) to the reconstruction, `xn`
//!   the normalised input (not minus `b_dec`); `decode` of codes alone has
//!   no input and leaves it out, as SAELens's `SkipTranscoder.decode` does.

use crate::arch::{Activation, ActivationKind, Threshold};
use crate::config::{InitScheme, ModelConfig, OutputActivation};
use crate::normalize::Normalizer;
use crate::sparse_codes::Entries;
use tch::{Device, Kind, TchError, Tensor};

/// Code density at or below which [`Sae::decode_normalized_sparse`] sums
/// decoder rows instead of a dense matmul (well below the ~16 % where the
/// training step's sparse pass stops paying: a decode alone has less dense
/// work to save).
pub const SPARSE_DECODE_DENSITY: f64 = 0.05;

/// The L2 norm of each row of `w` (`[rows]`): decoder rows' norms, as
/// SAELens's `W_dec.norm(dim=-1)`, for the penalties and rescaling.
pub fn row_norms(w: &Tensor) -> Tensor {
    w.norm_scalaropt_dim(2, [-1], false)
}

/// Everything about a model that is not a weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelSpec {
    pub d_in: i64,
    pub d_hidden: i64,
    pub activation: Activation,
    pub decoder_activation: OutputActivation,
    pub apply_b_dec_to_input: bool,
    pub tied: bool,
    /// SAELens's `rescale_acts_by_decoder_norm` (top-k): pre-activations
    /// are scaled by each latent's decoder-row norm before the selection,
    /// and codes by its inverse before decoding, so the selection does not
    /// depend on the decoder's scale. Training only: the saved model has the
    /// norms folded into its weights ([`Sae::fold_decoder_norm`]).
    pub rescale_acts_by_decoder_norm: bool,
}

impl ModelSpec {
    pub fn from_config(m: &ModelConfig, d_in: i64) -> ModelSpec {
        ModelSpec {
            d_in,
            d_hidden: m.d_hidden,
            activation: m.arch_activation(),
            decoder_activation: m.decoder_activation,
            apply_b_dec_to_input: m.apply_b_dec_to_input,
            tied: m.tied,
            rescale_acts_by_decoder_norm: m.rescale_acts_by_decoder_norm,
        }
    }
}

/// The magnitude path of a gated SAE: `relu(x @ (W_enc * exp(r_mag)) + b_mag)`.
#[derive(Debug)]
pub struct Gate {
    /// `[d_hidden]`
    pub r_mag: Tensor,
    /// `[d_hidden]`
    pub b_mag: Tensor,
}

/// A dense layer of a deep model: `y = x @ w + b`, `w [in, out]`.
#[derive(Debug)]
pub struct Layer {
    pub w: Tensor,
    pub b: Tensor,
}

#[derive(Debug)]
pub struct Sae {
    pub spec: ModelSpec,
    /// `[d_in, d_hidden]` (deep: `[width before the code, d_hidden]`)
    pub w_enc: Tensor,
    /// `[d_hidden]`
    pub b_enc: Tensor,
    /// `[d_hidden, d_out]`; `None` when tied (then it is `W_enc.T`).
    pub w_dec: Option<Tensor>,
    /// `[d_out]` (deep: the width after the code)
    pub b_dec: Tensor,
    /// jumprelu: learned thresholds `[d_hidden]` (a parameter); batchtopk: the
    /// inference threshold (a buffer; a scalar while training, `[d_hidden]`
    /// once saved). `None` for other activations.
    pub threshold: Option<Tensor>,
    /// Gated models: the magnitude path's parameters.
    pub gate: Option<Gate>,
    /// Deep models: ReLU layers from the input to `W_enc`, and from `W_dec`
    /// to the output (the last one followed by `decoder_activation`).
    pub enc_layers: Vec<Layer>,
    pub dec_layers: Vec<Layer>,
    /// Input normalisation.
    pub norm: Normalizer,
    /// Output normalisation when it differs from the input's (transcoders).
    pub out_norm: Option<Normalizer>,
    /// Skip models: `[d_out, d_in]`, the affine skip connection's weight
    /// (it adds `xn @ W_skip.T`; its bias is `b_dec`).
    pub w_skip: Option<Tensor>,
}

/// `nn.Linear(fan_in, fan_out)` weights, stored `[fan_in, fan_out]`, and bias.
fn torch_linear(fan_in: i64, fan_out: i64, device: Device) -> Result<Layer, TchError> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let opts = (Kind::Float, device);
    let w = Tensor::f_empty([fan_out, fan_in], opts)?
        .f_uniform_(-bound, bound)?
        .tr()
        .f_contiguous()?;
    let b = Tensor::f_empty([fan_out], opts)?.f_uniform_(-bound, bound)?;
    Ok(Layer { w, b })
}

impl Sae {
    /// Fresh weights on `device`, drawn from libtorch's global generator
    /// (seed it first for reproducible runs). `d_out` is the reconstruction's
    /// width (`d_in` except for transcoders); `m` gives the init scheme, deep
    /// widths, decoder norm and jumprelu threshold. The allocations are
    /// the run's largest: a failed one is returned (libtorch's error), not
    /// a panic.
    pub fn init(
        spec: ModelSpec,
        m: &ModelConfig,
        d_out: i64,
        norm: Normalizer,
        out_norm: Option<Normalizer>,
        device: Device,
    ) -> Result<Sae, TchError> {
        let opts = (Kind::Float, device);
        let d_h = spec.d_hidden;
        // Widths between the input and the code (deep models), mirrored after it.
        let inner: &[i64] = match m.hidden.len() {
            0 | 1 => &[],
            n => &m.hidden[..n - 1],
        };
        let mut chain_in = vec![spec.d_in];
        chain_in.extend_from_slice(inner);
        let mut chain_out: Vec<i64> = inner.iter().rev().copied().collect();
        chain_out.push(d_out);
        let (code_in, code_out) = (*chain_in.last().unwrap(), chain_out[0]);

        let enc_layers: Vec<Layer> = chain_in
            .windows(2)
            .map(|w| torch_linear(w[0], w[1], device))
            .collect::<Result<_, _>>()?;
        let (w_enc, b_enc, w_dec, b_dec) = match m.init_scheme {
            InitScheme::TorchLinear => {
                // Drawn in the order nn.Linear would: encoder weight, encoder
                // bias, decoder weight, decoder bias (weights stored transposed).
                let enc = torch_linear(code_in, d_h, device)?;
                let dec = torch_linear(d_h, code_out, device)?;
                (enc.w, enc.b, dec.w, dec.b)
            }
            InitScheme::Sae => {
                // Random decoder rows of norm decoder_init_norm; the encoder
                // starts as its transpose (when the shapes allow).
                // In place: no [d_hidden, d] temporaries (same values as
                // `t / norms * decoder_init_norm`).
                let rows = |n: i64| -> Result<Tensor, TchError> {
                    let mut t = Tensor::f_randn([d_h, n], opts)?;
                    let norms = t.f_norm_scalaropt_dim(2, [1], true)?;
                    let _ = t.f_div_(&norms)?;
                    let _ = t.f_mul_scalar_(m.decoder_init_norm)?;
                    Ok(t)
                };
                let w_dec = rows(code_out)?;
                let w_enc = if code_in == code_out {
                    w_dec.tr()
                } else {
                    rows(code_in)?.tr()
                };
                (
                    w_enc,
                    Tensor::f_zeros([d_h], opts)?,
                    w_dec,
                    Tensor::f_zeros([code_out], opts)?,
                )
            }
        };
        let dec_layers: Vec<Layer> = chain_out
            .windows(2)
            .map(|w| torch_linear(w[0], w[1], device))
            .collect::<Result<_, _>>()?;
        let arch = spec.activation.arch();
        let threshold = arch.init_threshold(d_h, &m.arch_settings(), device);
        // SAELens: r_mag and b_mag start at 0 (b_enc, the gate's bias, too).
        let gate = match arch.gated() {
            true => Some(Gate {
                r_mag: Tensor::f_zeros([d_h], opts)?,
                b_mag: Tensor::f_zeros([d_h], opts)?,
            }),
            false => None,
        };
        let w_dec = match spec.tied {
            true => None,
            false => Some(w_dec.f_contiguous()?),
        };
        // sparsify: zeros, so training starts from the plain model.
        let w_skip = match m.skip_connection {
            true => Some(Tensor::f_zeros([d_out, spec.d_in], opts)?),
            false => None,
        };
        Ok(Sae {
            spec,
            w_enc: w_enc.f_contiguous()?,
            b_enc,
            w_dec,
            b_dec,
            threshold,
            gate,
            enc_layers,
            dec_layers,
            norm: norm.to_device(device),
            out_norm: out_norm.map(|n| n.to_device(device)),
            w_skip,
        })
    }

    /// Whether the threshold is trained by gradient (jumprelu).
    fn threshold_is_parameter(&self) -> bool {
        self.spec.activation.arch().threshold() == Threshold::Parameter && self.threshold.is_some()
    }

    /// The trainable tensors, in a fixed order.
    pub fn parameters(&self) -> Vec<&Tensor> {
        self.named_parameters()
            .into_iter()
            .map(|(_, t)| t)
            .collect()
    }

    /// The trainable tensors with their names (SAELens's where it has one;
    /// deep layers `enc.N.w`...), in the order of [`Sae::parameters`].
    pub fn named_parameters(&self) -> Vec<(String, &Tensor)> {
        let mut p = vec![
            ("W_enc".to_string(), &self.w_enc),
            ("b_enc".into(), &self.b_enc),
        ];
        if let Some(w) = &self.w_dec {
            p.push(("W_dec".into(), w));
        }
        p.push(("b_dec".into(), &self.b_dec));
        if self.threshold_is_parameter() {
            p.push(("threshold".into(), self.threshold.as_ref().unwrap()));
        }
        if let Some(g) = &self.gate {
            p.push(("r_mag".into(), &g.r_mag));
            p.push(("b_mag".into(), &g.b_mag));
        }
        for (side, layers) in [("enc", &self.enc_layers), ("dec", &self.dec_layers)] {
            for (i, l) in layers.iter().enumerate() {
                p.push((format!("{side}.{i}.w"), &l.w));
                p.push((format!("{side}.{i}.b"), &l.b));
            }
        }
        // Last, so the positions of the others (checkpoints) do not move.
        if let Some(w) = &self.w_skip {
            p.push(("W_skip".into(), w));
        }
        p
    }

    /// The position of parameter `name` in [`Sae::parameters`].
    pub fn parameter_index(&self, name: &str) -> Option<usize> {
        self.named_parameters().iter().position(|(n, _)| n == name)
    }

    /// The trainable tensors, mutable, in the order of [`Sae::parameters`].
    pub fn parameters_mut(&mut self) -> Vec<&mut Tensor> {
        let with_threshold = self.threshold_is_parameter();
        let mut p = vec![&mut self.w_enc, &mut self.b_enc];
        if let Some(w) = &mut self.w_dec {
            p.push(w);
        }
        p.push(&mut self.b_dec);
        if with_threshold {
            p.push(self.threshold.as_mut().unwrap());
        }
        if let Some(g) = &mut self.gate {
            p.push(&mut g.r_mag);
            p.push(&mut g.b_mag);
        }
        for l in self.enc_layers.iter_mut().chain(self.dec_layers.iter_mut()) {
            p.push(&mut l.w);
            p.push(&mut l.b);
        }
        if let Some(w) = &mut self.w_skip {
            p.push(w);
        }
        p
    }

    pub fn set_requires_grad(&mut self, on: bool) {
        for t in self.parameters_mut() {
            *t = t.detach().set_requires_grad(on);
        }
    }

    /// `W_dec [d_hidden, d_out]` (a view of `W_enc.T` when tied).
    pub fn decoder_weight(&self) -> Tensor {
        match &self.w_dec {
            Some(w) => w.shallow_clone(),
            None => self.w_enc.tr(),
        }
    }

    /// Width of the reconstruction (`d_in`, or the target's for a transcoder).
    pub fn d_out(&self) -> i64 {
        match self.dec_layers.last() {
            Some(l) => l.w.size()[1],
            None => self.b_dec.size()[0],
        }
    }

    /// Whether the model has layers beyond the code layer (`model.hidden`).
    pub fn is_deep(&self) -> bool {
        !self.enc_layers.is_empty() || !self.dec_layers.is_empty()
    }

    /// Whether `W_dec` rows live in the output (data) space: not for deep models.
    pub fn decoder_rows_in_output_space(&self) -> bool {
        self.dec_layers.is_empty()
    }

    pub fn device(&self) -> Device {
        self.w_enc.device()
    }

    /// The normalisation of the output space.
    /// Whether the model reconstructs another array than its input
    /// (`data.target`): its own output normalisation, or another width.
    pub fn is_transcoder(&self) -> bool {
        self.out_norm.is_some() || self.d_out() != self.spec.d_in
    }

    pub fn output_norm(&self) -> &Normalizer {
        self.out_norm.as_ref().unwrap_or(&self.norm)
    }

    /// Normalised input through the deep layers (the input itself otherwise).
    fn through_layers(&self, xn: &Tensor) -> Tensor {
        let mut h = xn.shallow_clone();
        for l in &self.enc_layers {
            h = (h.matmul(&l.w) + &l.b).relu();
        }
        h
    }

    /// What the code layer reads: normalised input through the deep layers,
    /// minus `b_dec` when `apply_b_dec_to_input`.
    fn code_input(&self, xn: &Tensor) -> Tensor {
        let h = self.through_layers(xn);
        if self.spec.apply_b_dec_to_input {
            h - &self.b_dec
        } else {
            h
        }
    }

    /// Gated models: `relu(pi_gate)`, what their sparsity penalty and
    /// auxiliary reconstruction see; recomputed as SAELens does
    /// (`sae_in - b_dec * apply_b_dec_to_input`), so the autograd graph and
    /// its gradient sums match SAELens's.
    pub fn gate_codes(&self, xn: &Tensor) -> Option<Tensor> {
        self.gate.as_ref()?;
        let apply = if self.spec.apply_b_dec_to_input {
            1.0
        } else {
            0.0
        };
        let centered = self.through_layers(xn) - &self.b_dec * apply;
        Some((centered.matmul(&self.w_enc) + &self.b_enc).relu())
    }

    /// Pre-activations of already-normalised input (gated: the gate's).
    pub fn pre_activations(&self, xn: &Tensor) -> Tensor {
        self.rescaled_pre(self.code_input(xn).matmul(&self.w_enc) + &self.b_enc)
    }

    /// The decoder rows' norms `[d_hidden]` when the model rescales by them
    /// (`rescale_acts_by_decoder_norm`, SAELens's `W_dec.norm(dim=-1)`).
    pub fn decoder_norms(&self) -> Option<Tensor> {
        self.spec
            .rescale_acts_by_decoder_norm
            .then(|| row_norms(&self.decoder_weight()))
    }

    /// Pre-activations as the selection sees them: times the decoder norms
    /// when the model rescales.
    fn rescaled_pre(&self, pre: Tensor) -> Tensor {
        match self.decoder_norms() {
            Some(n) => pre * n,
            None => pre,
        }
    }

    /// Codes as the decoder takes them: over the decoder norms when the
    /// model rescales (SAELens: `feature_acts * (1 / W_dec.norm(dim=-1))`).
    pub fn rescaled_codes(&self, z: &Tensor) -> Tensor {
        match self.decoder_norms() {
            Some(n) => z * n.reciprocal(),
            None => z.shallow_clone(),
        }
    }

    /// Folds the decoder norms into the weights (SAELens `_fold_norm_topk`):
    /// `W_enc` and `b_enc` times the norms, `W_dec` over them; the model then
    /// computes the same codes and reconstructions without rescaling.
    pub fn fold_decoder_norm(&mut self) {
        let Some(n) = self.decoder_norms() else {
            return;
        };
        let _guard = tch::no_grad_guard();
        // SAELens `get_W_dec_norm`'s floor.
        let n = n.clamp_min(1e-8);
        let _ = self.w_enc.g_mul_(&n);
        let _ = self.b_enc.g_mul_(&n);
        if let Some(w) = self.w_dec.as_mut() {
            let _ = w.g_div_(&n.unsqueeze(1));
        }
        self.spec.rescale_acts_by_decoder_norm = false;
    }

    /// Folds a whitening normalisation (`data.normalize: whiten`) into the
    /// weights, in float64 (SAELens `fold_activation_whitening`). With
    /// `x_w = (x - m) @ M` on the input and `y = y_w @ N + m'` on the output
    /// (`N` the inverse whitening; the input's own unless a transcoder):
    /// - `W_enc <- M W_enc` (deep: the first layer's weight);
    /// - with `b_dec` subtracted from the input nothing else on that side,
    ///   since `(x - m) M - b_dec = (x - b_dec') M` with `b_dec'` below;
    ///   otherwise `b_enc <- b_enc - m W_enc'` (deep: the first layer's
    ///   bias; gated: `b_mag` by the same shift times `exp(r_mag)`);
    /// - `W_dec <- W_dec N`, `b_dec <- b_dec N + m'` (deep: the last layer).
    ///
    /// Pre-activations are unchanged, so thresholds and top-k selections
    /// are too; the model then reads and writes raw rows and has no
    /// normalisation. Decoder rows' norms change (unit-norm rows are unit
    /// in the whitened space only). Call after [`Sae::fold_decoder_norm`];
    /// tied, matching_pursuit and sigmoid-decoder models are refused by the
    /// config (their codes or outputs would change).
    pub fn fold_whitening(&mut self) {
        let take = |w: &crate::normalize::Whitening| {
            (
                w.mean.shallow_clone(),
                w.matrix.shallow_clone(),
                w.inverse.shallow_clone(),
            )
        };
        let input = self.norm.whiten.as_deref().map(take);
        let output = self.output_norm().whiten.as_deref().map(take);
        if input.is_none() && output.is_none() {
            return;
        }
        assert!(
            !self.spec.rescale_acts_by_decoder_norm && self.w_dec.is_some(),
            "fold_whitening: an untied model with its decoder norms folded"
        );
        let _guard = tch::no_grad_guard();
        let dbl = |t: &Tensor| t.detach().to_kind(Kind::Double);
        let f32 = |t: Tensor| t.to_kind(Kind::Float).contiguous();
        if let Some((m, w, _)) = input {
            match self.enc_layers.first_mut() {
                Some(l) => {
                    let w1 = w.mm(&dbl(&l.w));
                    l.b = f32(dbl(&l.b) - m.matmul(&w1));
                    l.w = f32(w1);
                }
                None => {
                    let w_enc = w.mm(&dbl(&self.w_enc));
                    if !self.spec.apply_b_dec_to_input {
                        let shift = m.matmul(&w_enc);
                        if let Some(g) = self.gate.as_mut() {
                            g.b_mag = f32(dbl(&g.b_mag) - &shift * dbl(&g.r_mag).exp());
                        }
                        self.b_enc = f32(dbl(&self.b_enc) - shift);
                    }
                    self.w_enc = f32(w_enc);
                }
            }
            self.norm = Normalizer::identity();
        }
        if let Some((m, _, inv)) = output {
            match self.dec_layers.last_mut() {
                Some(l) => {
                    l.b = f32(dbl(&l.b).matmul(&inv) + &m);
                    l.w = f32(dbl(&l.w).mm(&inv));
                }
                None => {
                    self.b_dec = f32(dbl(&self.b_dec).matmul(&inv) + &m);
                    let w_dec = self.w_dec.as_ref().map(|w| f32(dbl(w).mm(&inv)));
                    self.w_dec = w_dec;
                }
            }
            if let Some(n) = self.out_norm.as_mut() {
                *n = Normalizer::identity();
            }
        }
    }

    /// Codes from the code layer's input `x` and pre-activations `pre`
    /// (inference mode unless `train`).
    fn codes(&self, x: &Tensor, pre: &Tensor, train: bool) -> Tensor {
        let act = &self.spec.activation;
        if let Some(z) = act.arch().codes_from_input(self, x) {
            return z;
        }
        match &self.gate {
            Some(g) => {
                // SAELens order: W_enc * exp(r_mag), then the matmul.
                let pi_mag = x.matmul(&(&self.w_enc * g.r_mag.exp())) + &g.b_mag;
                crate::arch::gated(pre, &pi_mag)
            }
            None if train => act.apply_train(pre, self.threshold.as_ref()),
            None => act.apply(pre, self.threshold.as_ref()),
        }
    }

    /// Codes of already-normalised input (inference).
    pub fn encode_normalized(&self, xn: &Tensor) -> Tensor {
        let x = self.code_input(xn);
        let pre = self.rescaled_pre(x.matmul(&self.w_enc) + &self.b_enc);
        self.codes(&x, &pre, false)
    }

    /// One training forward pass on normalised input: pre-activations, codes
    /// in training mode (batch top-k over the batch, straight-through
    /// jumprelu), and the reconstruction.
    pub fn forward_train(&self, xn: &Tensor) -> Forward {
        if let Some(pre) = self.pre_relu_centred(xn) {
            let z = pre.relu();
            let recon = self.reconstruct_normalized(xn, &z);
            return Forward {
                pre,
                z,
                recon,
                leaf: None,
            };
        }
        let x = self.code_input(xn);
        // `mm`, not `matmul`: batches are 2-D, and matmul's shape dispatch
        // is a measurable share of a tiny model's step.
        let pre = self.rescaled_pre(x.mm(&self.w_enc) + &self.b_enc);
        let z = self.codes(&x, &pre, true);
        let recon = self.reconstruct_normalized(xn, &z);
        Forward {
            pre,
            z,
            recon,
            leaf: None,
        }
    }

    /// Pre-activations of ReLU models that subtract `b_dec` from the input,
    /// bit for bit those of `forward_train`, but with b_dec's gradient
    /// through the encoder as one vector-matrix product, `-(Σ_batch g)·W_encᵀ`,
    /// instead of the `[batch, d_hidden] × [d_hidden, d_in]` input-gradient
    /// matmul autograd would do: a sixth of a step's matmul FLOPs. Only for
    /// plain ReLU: the two orders of summation differ in rounding, which a
    /// continuous activation absorbs but a top-k or threshold selection
    /// could turn into a different choice. Not under autocast
    /// (`train.precision: bf16`): there `v`'s gradient would be rounded to
    /// bfloat16 where PyTorch's autograd rounds none.
    fn pre_relu_centred(&self, xn: &Tensor) -> Option<Tensor> {
        let plain = self.spec.apply_b_dec_to_input
            && !crate::autocast::is_enabled(xn.device())
            && self.spec.activation.kind == ActivationKind::Relu
            && self.enc_layers.is_empty()
            && self.gate.is_none()
            && !xn.requires_grad()
            && xn.dim() == 2;
        if !plain {
            return None;
        }
        let centred = (xn - &self.b_dec).detach();
        // Zero in value (v - v), with gradient -g to v = b_dec·W_enc.
        let v = self.b_dec.unsqueeze(0).mm(&self.w_enc.detach());
        let zero = v.detach() - v;
        Some(centred.mm(&self.w_enc) + (&self.b_enc + zero))
    }

    /// [`Sae::decode_normalized`] of codes `[rows, d_hidden]` that are
    /// mostly zeros (at most [`SPARSE_DECODE_DENSITY`] firing) as a sum of
    /// the firing latents' decoder rows (`embedding_bag`) instead of a dense
    /// matmul: equal up to summation order. Other codes and models (tied,
    /// deep) take the dense path. For evaluation, where a 65,536-latent
    /// top-k model's dense decode cost as much as its encoder.
    pub fn decode_normalized_sparse(&self, z: &Tensor) -> Tensor {
        let (true, true, 2) = (self.w_dec.is_some(), self.dec_layers.is_empty(), z.dim()) else {
            return self.decode_normalized(z);
        };
        let (rows, h) = (z.size()[0], z.size()[1]);
        let nnz = z.count_nonzero(None).int64_value(&[]);
        if rows == 0 || nnz as f64 > SPARSE_DECODE_DENSITY * (rows * h) as f64 {
            return self.decode_normalized(z);
        }
        let flat = z.view([-1]).nonzero().squeeze_dim(1);
        let entries = Entries::from_flat(&flat, rows, h);
        self.decode_entries(&entries, &z.view([-1]).index_select(0, &flat))
    }

    /// The reconstruction (normalised space) of codes given at `entries`
    /// only (`vals`, `[nnz]`): the sum of each row's decoder rows weighted
    /// by its codes (`embedding_bag`, gradients to `W_dec` and `vals`),
    /// plus `b_dec`, then the output activation. Untied, shallow models.
    pub fn decode_entries(&self, entries: &Entries, vals: &Tensor) -> Tensor {
        let w_dec = self.w_dec.as_ref().expect("an untied decoder");
        let scaled;
        let vals = match self.decoder_norms() {
            Some(n) => {
                scaled = vals * n.reciprocal().index_select(0, &entries.cols);
                &scaled
            }
            None => vals,
        };
        let (sum, _, _, _) = Tensor::embedding_bag(
            w_dec,
            &entries.cols,
            &entries.offsets,
            false,
            0,
            false,
            Some(vals),
            false,
        );
        let out = sum + &self.b_dec;
        match self.spec.decoder_activation {
            OutputActivation::None => out,
            OutputActivation::Sigmoid => out.sigmoid(),
        }
    }

    /// Reconstruction in the normalised space.
    pub fn decode_normalized(&self, z: &Tensor) -> Tensor {
        let z = &self.rescaled_codes(z);
        let mut out = match z.dim() {
            2 => z.mm(&self.decoder_weight()),
            _ => z.matmul(&self.decoder_weight()),
        } + &self.b_dec;
        for l in &self.dec_layers {
            out = out.relu().matmul(&l.w) + &l.b;
        }
        match self.spec.decoder_activation {
            OutputActivation::None => out,
            OutputActivation::Sigmoid => out.sigmoid(),
        }
    }

    /// `out` (a decoder output in the normalised space) plus the skip term
    /// of the normalised input `xn`, `xn @ W_skip.T`, for skip models
    /// (sparsify: `sae_out += x @ W_skip.mT`, after `b_dec`).
    pub fn add_skip(&self, xn: &Tensor, out: Tensor) -> Tensor {
        match &self.w_skip {
            None => out,
            Some(w) if xn.dim() == 2 => out + xn.mm(&w.tr()),
            Some(w) => out + xn.matmul(&w.tr()),
        }
    }

    /// The reconstruction (normalised space) of normalised input `xn` from
    /// its codes `z`: the decoder's output plus the skip term.
    pub fn reconstruct_normalized(&self, xn: &Tensor, z: &Tensor) -> Tensor {
        self.add_skip(xn, self.decode_normalized(z))
    }

    pub fn encode(&self, x: &Tensor) -> Tensor {
        self.encode_normalized(&self.norm.apply(x))
    }

    /// The decoder's output (data space). Skip models: without the skip
    /// term, which needs the input (see [`Sae::reconstruct`]).
    pub fn decode(&self, z: &Tensor) -> Tensor {
        self.output_norm().invert(&self.decode_normalized(z))
    }

    /// The reconstruction (data space) of raw input `x` from codes `z`
    /// (any encoder's): the decoder's output plus the skip term.
    pub fn reconstruct(&self, x: &Tensor, z: &Tensor) -> Tensor {
        let out = match &self.w_skip {
            None => self.decode_normalized(z),
            Some(_) => self.reconstruct_normalized(&self.norm.apply(x), z),
        };
        self.output_norm().invert(&out)
    }

    /// The model's own reconstruction of normalised input `xn` (normalised space).
    pub fn forward_normalized(&self, xn: &Tensor) -> Tensor {
        self.reconstruct_normalized(xn, &self.encode_normalized(xn))
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.output_norm()
            .invert(&self.forward_normalized(&self.norm.apply(x)))
    }

    /// The threshold as saved: `[d_hidden]` float32 (a batchtopk scalar expanded).
    pub fn threshold_for_saving(&self) -> Option<Tensor> {
        self.threshold.as_ref().map(|t| {
            t.detach()
                .to_kind(Kind::Float)
                .expand([self.spec.d_hidden], false)
                .contiguous()
        })
    }
}

/// The view architectures work on (`crate::arch::Params`).
impl crate::arch::Params for Sae {
    fn decoder_weight(&self) -> Tensor {
        Sae::decoder_weight(self)
    }

    fn b_dec(&self) -> &Tensor {
        &self.b_dec
    }

    fn threshold_mut(&mut self) -> Option<&mut Tensor> {
        self.threshold.as_mut()
    }

    fn threshold_for_saving(&self) -> Option<Tensor> {
        Sae::threshold_for_saving(self)
    }

    fn gate(&self) -> Option<(&Tensor, &Tensor)> {
        self.gate.as_ref().map(|g| (&g.r_mag, &g.b_mag))
    }

    fn gate_codes(&self, xn: &Tensor) -> Option<Tensor> {
        Sae::gate_codes(self, xn)
    }

    fn decode_normalized(&self, z: &Tensor) -> Tensor {
        Sae::decode_normalized(self, z)
    }

    fn output_activation(&self, out: Tensor) -> Tensor {
        match self.spec.decoder_activation {
            OutputActivation::None => out,
            OutputActivation::Sigmoid => out.sigmoid(),
        }
    }
}

/// The tensors of one training forward pass.
pub struct Forward {
    pub pre: Tensor,
    pub z: Tensor,
    pub recon: Tensor,
    /// The leaf of a ReLU-like pass ([`crate::sparse_step`]): after
    /// backward, the encoder's gradients come from it.
    pub leaf: Option<crate::sparse_codes::LeafCodes>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    /// ReLU with b_dec subtracted: the shortcut's forward values are bit
    /// for bit autograd's on `(x - b_dec)·W_enc + b_enc`, and its gradients
    /// equal autograd's (W_enc, b_enc, W_dec exactly; b_dec up to rounding).
    #[test]
    fn centred_relu_shortcut_matches_autograd() {
        let _rng = crate::seeded();
        tch::manual_seed(0);
        let cfg = ModelConfig {
            d_hidden: 48,
            init_scheme: InitScheme::Sae,
            ..ModelConfig::default()
        };
        let spec = ModelSpec::from_config(&cfg, 12);
        assert!(spec.apply_b_dec_to_input && spec.activation.kind == ActivationKind::Relu);
        let x = Tensor::randn([33, 12], (Kind::Float, Device::Cpu)) + 3.0;
        let mut m = Sae::init(spec, &cfg, 12, Normalizer::identity(), None, Device::Cpu).unwrap();
        let _ = m.b_dec.detach().uniform_(2.0, 4.0);
        let _ = m.b_enc.detach().uniform_(-0.1, 0.1);
        m.set_requires_grad(true);
        let loss_of =
            |f: &Forward| f.recon.mse_loss(&x, tch::Reduction::Mean) + f.z.sum(Kind::Float) * 0.01;
        let f = m.forward_train(&x);
        assert!(m.pre_relu_centred(&x).is_some(), "shortcut not taken");
        loss_of(&f).backward();
        let ours: Vec<Tensor> = m.parameters().iter().map(|p| p.grad().copy()).collect();
        for p in m.parameters_mut() {
            p.zero_grad();
        }
        let pre = (&x - &m.b_dec).mm(&m.w_enc) + &m.b_enc;
        let z = pre.relu();
        let reference = Forward {
            recon: m.decode_normalized(&z),
            pre,
            z,
            leaf: None,
        };
        loss_of(&reference).backward();
        assert!(f.pre.equal(&reference.pre) && f.recon.equal(&reference.recon));
        let names = ["w_enc", "b_enc", "w_dec", "b_dec"];
        for ((a, p), name) in ours.iter().zip(m.parameters()).zip(names) {
            let b = p.grad();
            if name == "b_dec" {
                assert!(a.allclose(&b, 1e-5, 1e-7, false), "{name}: {a} vs {b}");
            } else {
                assert!(a.equal(&b), "{name} gradient differs");
            }
        }
    }

    /// Rows with correlated, unequal-variance columns and an offset.
    fn correlated(n: i64, d: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        let opts = (Kind::Float, Device::Cpu);
        let mix = Tensor::randn([d, d], opts) * Tensor::linspace(0.1, 3.0, d, opts).unsqueeze(1);
        Tensor::randn([n, d], opts).mm(&mix) + Tensor::randn([d], opts) * 2.0
    }

    /// Whitened training rows have mean 0 and covariance (C + eps I)^-1 C,
    /// I for eps -> 0 (SAELens's construction); un-whitening inverts.
    #[test]
    fn whitening_gives_identity_covariance() {
        let _rng = crate::seeded();
        let x = correlated(2000, 10, 3);
        let n = Normalizer::fit(crate::config::NormalizeKind::Whiten, &x, 1e-10);
        let xw = n.apply(&x).to_kind(Kind::Double);
        let mean = xw.mean_dim(0, true, Kind::Double);
        let xc = &xw - &mean;
        let cov = xc.tr().mm(&xc) / 1999.0;
        let eye = Tensor::eye(10, (Kind::Double, Device::Cpu));
        let dcov = (cov - eye).abs().max().double_value(&[]);
        let dmean = mean.abs().max().double_value(&[]);
        assert!(
            dcov < 1e-4 && dmean < 1e-4,
            "cov - I {dcov:.2e}, mean {dmean:.2e}"
        );
        let back = n.invert(&n.apply(&x));
        let d = (back - &x).abs().max().double_value(&[]);
        assert!(d < 1e-4, "invert(apply(x)) - x = {d:.2e}");
        // A streamed fit gives the same statistics: bit for bit in the
        // chunks training takes, to rounding in others.
        let whiten = crate::config::NormalizeKind::Whiten;
        let x = correlated(20_000, 10, 3);
        let n = Normalizer::fit(whiten, &x, 1e-3);
        for (chunk, exact) in [(crate::normalize::WHITEN_CHUNK, true), (300, false)] {
            let c = Normalizer::fit_chunked(whiten, &x, chunk, "x", 1e-3).unwrap();
            let (a, b) = (n.whiten.as_ref().unwrap(), c.whiten.as_ref().unwrap());
            for (u, v) in [
                (&a.mean, &b.mean),
                (&a.matrix, &b.matrix),
                (&a.inverse, &b.inverse),
            ] {
                match exact {
                    true => assert!(u.equal(v), "chunk {chunk}"),
                    false => assert!(u.allclose(v, 1e-9, 1e-9, false), "chunk {chunk}"),
                }
            }
        }
    }

    /// The folded model on raw rows gives the codes and reconstruction the
    /// whitened one gives, for every foldable kind of model.
    #[test]
    fn folded_whitening_equals_whitened_model() {
        use crate::config::NormalizeKind::Whiten;
        let _rng = crate::seeded();
        let (n, d) = (300, 12);
        let x = correlated(n, d, 4);
        let y = correlated(n, 7, 5);
        let relu = ModelConfig {
            d_hidden: 40,
            init_scheme: InitScheme::Sae,
            ..ModelConfig::default()
        };
        let cases: Vec<(&str, ModelConfig, bool)> = vec![
            ("relu", relu.clone(), false),
            (
                "relu, b_dec not subtracted",
                ModelConfig {
                    apply_b_dec_to_input: false,
                    ..relu.clone()
                },
                false,
            ),
            (
                "topk",
                ModelConfig {
                    activation: ActivationKind::Topk,
                    k: Some(5),
                    ..relu.clone()
                },
                false,
            ),
            (
                "jumprelu",
                ModelConfig {
                    activation: ActivationKind::Jumprelu,
                    jumprelu_init_threshold: 0.3,
                    ..relu.clone()
                },
                false,
            ),
            (
                "gated",
                ModelConfig {
                    activation: ActivationKind::Gated,
                    ..relu.clone()
                },
                false,
            ),
            (
                "gated, b_dec not subtracted",
                ModelConfig {
                    activation: ActivationKind::Gated,
                    apply_b_dec_to_input: false,
                    ..relu.clone()
                },
                false,
            ),
            (
                "deep",
                ModelConfig {
                    hidden: vec![20, 40],
                    apply_b_dec_to_input: false,
                    ..relu.clone()
                },
                false,
            ),
            (
                "transcoder",
                ModelConfig {
                    apply_b_dec_to_input: false,
                    ..relu.clone()
                },
                true,
            ),
        ];
        for (name, cfg, transcoder) in cases {
            tch::manual_seed(6);
            let spec = ModelSpec::from_config(&cfg, d);
            let norm = Normalizer::fit(Whiten, &x, 1e-3);
            let (d_out, out_norm) = match transcoder {
                true => (7, Some(Normalizer::fit(Whiten, &y, 1e-3))),
                false => (d, None),
            };
            let mut m = Sae::init(spec, &cfg, d_out, norm, out_norm, Device::Cpu).unwrap();
            // Non-zero biases and gate parameters, so every fold term counts.
            let _ = m.b_enc.uniform_(-0.3, 0.3);
            let _ = m.b_dec.uniform_(-0.5, 0.5);
            if let Some(g) = m.gate.as_mut() {
                let _ = g.r_mag.uniform_(-0.5, 0.5);
                let _ = g.b_mag.uniform_(-0.3, 0.3);
            }
            let (z0, r0) = (m.encode(&x), m.forward(&x));
            let firing = z0
                .gt(0.0)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]);
            assert!(
                firing > 0.02 && firing < 0.9,
                "{name}: {firing} of codes fire"
            );
            m.fold_whitening();
            assert!(
                m.norm.whiten.is_none() && m.output_norm().whiten.is_none(),
                "{name}"
            );
            assert_eq!(m.norm.kind, crate::config::NormalizeKind::None, "{name}");
            let (z1, r1) = (m.encode(&x), m.forward(&x));
            let dz = (&z1 - &z0).abs().max().double_value(&[]);
            let dr = (&r1 - &r0).abs().max().double_value(&[]);
            let scale = r0.abs().max().double_value(&[]);
            assert!(
                z1.gt(0.0).equal(&z0.gt(0.0)),
                "{name}: firing pattern changed"
            );
            assert!(
                dz < 1e-4 && dr < 1e-5 * scale.max(1.0),
                "{name}: codes {dz:.2e}, recon {dr:.2e}"
            );
        }
    }

    /// The sparse decode equals the dense one up to summation order, and
    /// dense codes take the dense path (bit for bit).
    #[test]
    fn sparse_decode_matches_dense() {
        let _rng = crate::seeded();
        tch::manual_seed(2);
        let cfg = ModelConfig {
            d_hidden: 200,
            init_scheme: InitScheme::Sae,
            ..ModelConfig::default()
        };
        let spec = ModelSpec::from_config(&cfg, 12);
        let m = Sae::init(spec, &cfg, 12, Normalizer::identity(), None, Device::Cpu).unwrap();
        let _ = m.b_dec.detach().uniform_(-0.5, 0.5);
        let z = Tensor::randn([50, 200], (Kind::Float, Device::Cpu)) - 2.5;
        let z = z.relu();
        let sparse = z
            .gt(0.0)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(
            sparse > 0.0 && sparse <= SPARSE_DECODE_DENSITY,
            "density {sparse}"
        );
        let (a, b) = (m.decode_normalized(&z), m.decode_normalized_sparse(&z));
        let diff = (&a - &b).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "sparse decode differs by {diff}");
        let dense = Tensor::randn([50, 200], (Kind::Float, Device::Cpu)).relu();
        assert!(m
            .decode_normalized(&dense)
            .equal(&m.decode_normalized_sparse(&dense)));
    }
}
