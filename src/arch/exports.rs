//! What an architecture says about its exports, as data the exporters
//! consume: the TorchScript of its activation (`export::torchscript` writes
//! it into the module) and its SAELens fields (`Architecture::saelens`).

use tch::Tensor;

/// A simple module attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Bool(bool),
    Float(f64),
}

/// The TorchScript that maps pre-activations `pre` to codes (the body of
/// `def activation(self, pre: Tensor) -> Tensor`, indented 4 spaces), plus
/// extra parameters/buffers (name, tensor, is a parameter) and attributes it
/// reads. Each architecture gives its own (`Architecture::torchscript`).
///
/// Architectures whose codes need the code layer's input rather than the
/// pre-activations (`Architecture::codes_from_input`) set `from_input`:
/// `body` is then that of `def codes(self, x: Tensor) -> Tensor`, where `x`
/// is the normalised input minus `b_dec` (when `apply_b_dec_to_input`), and
/// `encode` returns `self.codes(x)` without computing pre-activations.
pub struct ActivationCode {
    pub body: String,
    pub tensors: Vec<(String, Tensor, bool)>,
    pub attrs: Vec<(String, AttrValue)>,
    pub from_input: bool,
}

impl ActivationCode {
    /// A body that reads nothing but `pre`.
    pub fn simple(body: &str) -> ActivationCode {
        ActivationCode {
            body: body.into(),
            tensors: vec![],
            attrs: vec![],
            from_input: false,
        }
    }
}
