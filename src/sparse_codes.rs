//! Sparse codes as data: the entries of a batch's codes a sparse pass
//! works on, and the leaf such a pass hands the loss. `crate::sparse_step`
//! makes and differentiates them; the model decodes them.

use tch::{Kind, Tensor};

/// The entries of a `[rows, d_hidden]` batch of codes that a sparse pass
/// works on.
pub struct Entries {
    /// Row and latent of each entry, grouped by row (`[nnz]` int64).
    pub rows: Tensor,
    pub cols: Tensor,
    /// Where each row's entries start (`[rows]`), for `embedding_bag`.
    pub offsets: Tensor,
}

impl Entries {
    /// From flat indices into a `[rows, h]` matrix, grouped by row.
    pub fn from_flat(flat: &Tensor, rows: i64, h: i64) -> Entries {
        let r = flat.floor_divide_scalar(h);
        let counts = r.bincount::<Tensor>(None, rows);
        Entries {
            cols: flat.remainder(h),
            offsets: counts.cumsum(0, Kind::Int64) - counts,
            rows: r,
        }
    }
}

/// The leaf of a ReLU-like training pass: what the loss differentiates
/// instead of the encoder's weights, and how to turn its gradient into the
/// encoder's.
pub struct LeafCodes {
    /// The code layer's input (normalised, minus `b_dec` when applied); no
    /// gradient.
    pub(crate) x: Tensor,
    /// Pre-activations, requiring gradient: `[batch, d_hidden]`, or `[nnz]`
    /// at `support`.
    pub pre: Tensor,
    /// The codes from `pre` (gradients to `pre` and the threshold), same
    /// shape as `pre`.
    pub codes: Tensor,
    /// The thresholds at the support's latents (jumprelu; `[nnz]`, with
    /// gradient to the model's threshold); the model's own when dense.
    pub threshold: Option<Tensor>,
    /// `None`: dense.
    pub support: Option<Entries>,
    /// Rows in the batch.
    pub batch: i64,
}
