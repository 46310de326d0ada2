//! Model files: what `--model` accepts, and the export formats.

pub mod safetensors;

use crate::error::user;
use crate::model::Sae;
use crate::{bail_user, Result};
use std::path::{Path, PathBuf};
use tch::Device;

/// The weights file inside a run directory.
pub const RUN_MODEL_FILE: &str = "model.safetensors";

/// Loads a model from a run directory or a `.safetensors` file written by
/// this tool, onto `device`.
pub fn load_model(spec: &str, device: Device) -> Result<Sae> {
    let path = PathBuf::from(spec);
    let file = resolve_model_path(&path)?;
    safetensors::load(&file, device)
}

fn resolve_model_path(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        let f = path.join(RUN_MODEL_FILE);
        if f.is_file() {
            return Ok(f);
        }
        bail_user!(
            "{}: not a run directory (no {RUN_MODEL_FILE}); pass a run directory or a .safetensors file",
            path.display()
        );
    }
    if !path.exists() {
        return Err(user(format!(
            "{}: no such model file or directory",
            path.display()
        )));
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Ok(path.to_owned()),
        _ => bail_user!(
            "{}: unrecognised model format; expected a run directory or a .safetensors file",
            path.display()
        ),
    }
}
