//! `RUN/checkpoint/`: everything `--resume` needs to continue a run exactly:
//! parameters, optimizer moments and step, the non-parameter buffers that
//! training updates (BatchTopK's threshold, the dead-latent counters), and
//! the loop position. One safetensors file written by temp + fsync + rename,
//! so the previous checkpoint stays intact until the new one is complete.
//!
//! Tensors are stored by position in `Sae::parameters()` (`param.N`, then
//! the optimizer's state of it: Adam's `exp_avg.N`, `exp_avg_sq.N`; signum's
//! `z.N`; Muon's `momentum.N`), so any architecture checkpoints the same way,
//! and in their own dtype (float32, float64, int64), so a resumed run
//! continues bit for bit. The RNG needs no state: training re-seeds libtorch
//! from `(seed, step)` at each step that draws random numbers.

use crate::error::user;
use crate::model::Sae;
use crate::optimizer::Optimizer;
use crate::{bail_user, Result};
use safetensors::tensor::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub const DIR: &str = "checkpoint";
const FILE: &str = "state.safetensors";
const META_KEY: &str = "train_state";
/// lp_anneal's `[p, next_p, changes made, weight]` (float64) and its queue
/// of norms (float32 `[n, 2]`).
const ANNEAL_STATE: &str = "anneal.state";
const ANNEAL_QUEUE: &str = "anneal.queue";

/// Where the loop stands: the next step resumes at `epoch`, batch `batch`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Steps done.
    pub step: i64,
    /// Epoch of the next step (1-based).
    pub epoch: i64,
    /// Index of the next batch within that epoch.
    pub batch: i64,
    /// Training samples seen.
    pub samples: i64,
    /// Optimizer steps done (Adam's bias-correction counter; signum's
    /// and Muon's Adam part's count).
    pub adam_step: i64,
    /// Loss of the last logged step (the summary's `final_loss`).
    pub last_loss: Option<f64>,
}

pub fn path(run: &Path) -> PathBuf {
    run.join(DIR).join(FILE)
}

/// The training state that is not a model parameter.
pub struct Buffers<'a> {
    /// Steps since each latent last fired (int64 `[d_hidden]`).
    pub since_fired: &'a mut Tensor,
    /// lp_anneal's p, weight and queue of norms.
    pub anneal: Option<&'a mut crate::anneal::PAnneal>,
}

/// A checkpoint tensor's safetensors dtype and bytes per element.
fn dtype_of(t: &Tensor) -> Result<(Dtype, usize)> {
    Ok(match t.kind() {
        Kind::Float => (Dtype::F32, 4),
        Kind::Double => (Dtype::F64, 8),
        Kind::Int64 => (Dtype::I64, 8),
        other => anyhow::bail!("checkpoint: cannot store a tensor of kind {other:?}"),
    })
}

/// Elements copied out of a tensor at a time while writing.
const WRITE_CHUNK: i64 = 1 << 20;

/// Writes `t`'s elements little-endian, `WRITE_CHUNK` at a time: no copy of
/// the whole tensor (a checkpoint is parameters plus two moments, three
/// times the model; whole copies tripled the training peak at 65,536
/// latents).
fn write_tensor(w: &mut impl Write, t: &Tensor, file: &Path) -> Result<()> {
    let flat = t
        .detach()
        .to_device(tch::Device::Cpu)
        .contiguous()
        .flatten(0, -1);
    let n = flat.numel() as i64;
    let mut bytes = Vec::new();
    let mut start = 0;
    while start < n {
        let part = flat.narrow(0, start, WRITE_CHUNK.min(n - start));
        bytes.clear();
        match t.kind() {
            Kind::Float => {
                for v in Vec::<f32>::try_from(&part)? {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
            Kind::Double => {
                for v in Vec::<f64>::try_from(&part)? {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
            _ => {
                for v in Vec::<i64>::try_from(&part)? {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        w.write_all(&bytes)
            .map_err(|e| crate::fsutil::write_error(file, e))?;
        start += part.size()[0];
    }
    Ok(())
}

/// The safetensors header for `named` tensors stored in that order.
fn header(named: &[(String, &Tensor)], meta: &HashMap<String, String>) -> Result<Vec<u8>> {
    let mut fields = serde_json::Map::new();
    fields.insert("__metadata__".into(), serde_json::to_value(meta)?);
    let mut offset = 0usize;
    for (name, t) in named {
        let (dtype, size) = dtype_of(t)?;
        let len = t.numel() * size;
        fields.insert(
            name.clone(),
            serde_json::json!({
                "dtype": format!("{dtype:?}"),
                "shape": t.size(),
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut json = serde_json::to_vec(&fields)?;
    // The data starts 8-byte aligned, as safetensors writers pad it.
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    Ok(json)
}

/// Writes the checkpoint atomically.
pub fn save(
    run: &Path,
    model: &Sae,
    opt: &Optimizer,
    buffers: &Buffers,
    pos: &Position,
) -> Result<()> {
    let dir = run.join(DIR);
    std::fs::create_dir_all(&dir)
        .map_err(|e| user(format!("{}: cannot create: {e}", dir.display())))?;
    let mut named: Vec<(String, &Tensor)> = Vec::new();
    for (i, p) in model.parameters().into_iter().enumerate() {
        named.push((format!("param.{i}"), p));
        named.extend(opt.state_of(i));
    }
    // Scalars as 0-d float64 tensors, exact.
    let scalars: Vec<(String, Tensor)> = opt
        .scalars()
        .into_iter()
        .map(|(n, v)| (n.to_string(), Tensor::from(v)))
        .collect();
    named.extend(scalars.iter().map(|(n, t)| (n.clone(), t)));
    if let Some(t) = &model.threshold {
        named.push(("threshold".into(), t));
    }
    named.push(("since_fired".into(), &*buffers.since_fired));
    let anneal = buffers.anneal.as_ref().map(|a| a.to_tensors());
    if let Some((head, queue)) = &anneal {
        named.push((ANNEAL_STATE.into(), head));
        named.push((ANNEAL_QUEUE.into(), queue));
    }
    let meta = HashMap::from([(META_KEY.to_string(), serde_json::to_string(pos)?)]);
    let head = header(&named, &meta)?;
    let file = path(run);
    crate::fsutil::write_atomic(&file, |w| {
        w.write_all(&(head.len() as u64).to_le_bytes())
            .and_then(|_| w.write_all(&head))
            .map_err(|e| crate::fsutil::write_error(&file, e))?;
        for (_, t) in &named {
            write_tensor(w, t, &file)?;
        }
        Ok(())
    })
}

/// The stored position alone (no tensors restored).
pub fn read_position(run: &Path) -> Result<Position> {
    let file = path(run);
    let bytes = read_bytes(run)?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| user(format!("{}: not a valid checkpoint: {e}", file.display())))?;
    parse_position(header.metadata(), &file)
}

fn parse_position(meta: &Option<HashMap<String, String>>, file: &Path) -> Result<Position> {
    let text = meta.as_ref().and_then(|m| m.get(META_KEY)).ok_or_else(|| {
        user(format!(
            "{}: not a checkpoint (no `{META_KEY}`)",
            file.display()
        ))
    })?;
    serde_json::from_str(text).map_err(|e| {
        user(format!(
            "{}: unreadable checkpoint state: {e}",
            file.display()
        ))
    })
}

fn read_bytes(run: &Path) -> Result<Vec<u8>> {
    let file = path(run);
    if !file.is_file() {
        bail_user!(
            "{}: no checkpoint to resume from (the run stopped before its first \
             checkpoint, train.checkpoint_every steps in; start it again)",
            run.display()
        );
    }
    std::fs::read(&file).map_err(|e| user(format!("{}: cannot read: {e}", file.display())))
}

/// Restores parameters, optimizer state and buffers in place; returns the position.
pub fn load(
    run: &Path,
    model: &mut Sae,
    opt: &mut Optimizer,
    buffers: &mut Buffers,
) -> Result<Position> {
    let file = path(run);
    let bytes = read_bytes(run)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| user(format!("{}: not a valid checkpoint: {e}", file.display())))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| user(format!("{}: not a valid checkpoint: {e}", file.display())))?;
    let pos = parse_position(header.metadata(), &file)?;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F64 => Kind::Double,
            Dtype::I64 => Kind::Int64,
            other => bail_user!("{}: tensor `{name}` has dtype {other:?}", file.display()),
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        t.insert(name, Tensor::from_data_size(view.data(), &shape, kind));
    }
    let mut take = |name: String, like: &Tensor| -> Result<Tensor> {
        let v = t.remove(&name).ok_or_else(|| {
            user(format!(
                "{}: tensor `{name}` is missing: the checkpoint does not belong to this config",
                file.display()
            ))
        })?;
        if v.size() != like.size() || v.kind() != like.kind() {
            bail_user!(
                "{}: tensor `{name}` is {:?} {:?}, but this config's model needs {:?} {:?}",
                file.display(),
                v.kind(),
                v.size(),
                like.kind(),
                like.size()
            );
        }
        Ok(v.to_device(like.device()))
    };
    let _guard = tch::no_grad_guard();
    for (i, p) in model.parameters_mut().into_iter().enumerate() {
        let value = take(format!("param.{i}"), p)?;
        p.copy_(&value);
        // Copied in, not swapped: the moments keep the flat buffers Adam
        // made them in, so its flat path takes them without a copy.
        for (name, s) in opt.state_of_mut(i) {
            let value = take(name, s)?;
            s.copy_(&value);
        }
    }
    for (name, _) in opt.scalars() {
        let value = take(name.to_string(), &Tensor::from(0f64))?;
        opt.set_scalar(name, value.double_value(&[]));
    }
    if let Some(th) = model.threshold.as_mut() {
        let value = take("threshold".into(), th)?;
        th.copy_(&value);
    }
    *buffers.since_fired = take("since_fired".into(), buffers.since_fired)?;
    if let Some(a) = buffers.anneal.as_mut() {
        let (head, queue) = match (t.remove(ANNEAL_STATE), t.remove(ANNEAL_QUEUE)) {
            (Some(h), Some(q)) => (h, q),
            _ => bail_user!(
                "{}: no p-annealing state (`{ANNEAL_STATE}`): the checkpoint does not belong \
                 to this config (sparsity.penalty: lp_anneal)",
                file.display()
            ),
        };
        a.load_tensors(&head, &queue)
            .map_err(|e| user(format!("{}: {e}", file.display())))?;
    }
    if let Some(extra) = t.keys().next() {
        bail_user!(
            "{}: tensor `{extra}` does not belong to this config's model",
            file.display()
        );
    }
    opt.set_steps(pos.adam_step);
    Ok(pos)
}
