//! AlphaEdit (Fang et al., 2025, "AlphaEdit: Null-Space Constrained
//! Knowledge Editing for Language Models").
//!
//! MEMIT trades the new keys against `C` softly, so every batch moves the
//! outputs of ordinary keys a little, and a long sequence of batches
//! accumulates into a broken model. AlphaEdit removes that trade-off: the
//! update is confined to the null space of the preserved keys,
//! `ΔW = ΔW P`, with `P` the projector onto the eigenvectors of `C` whose
//! eigenvalues are below a threshold, so `ΔW k₀ ≈ 0` for the keys `C` was
//! built from. The keys `K_p` of earlier AlphaEdit edits (in the editor's
//! journal; undone edits drop out) are preserved by the solve itself:
//!
//! `ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹`
//!
//! (α = 1 in the paper's formula, `L2` in the reference configurations).
//! The solution lies in the range of `P`, which gives the symmetric form
//! `ΔW = R Q₁ᵀ (α I + Q Qᵀ)⁻¹` with `Q = P [K_p K₁]`, and with the
//! orthonormal null-space basis `B` (`P = B Bᵀ`, `G = Bᵀ [K_p K₁]`):
//!
//! `ΔW = R · [B (α I + G Gᵀ)⁻¹ G₁]ᵀ`,
//!
//! a `dim × dim` system in the null space's coordinates instead of a
//! `d_ff × d_ff` one. Keys, residuals and the spreading over layers are
//! MEMIT's (see [`super::memit`]); the keys stored in a delta are the keys
//! at each layer after the lower layers were updated, which are the keys of
//! the edited model, as the reference accumulates them.
//!
//! ## Threshold
//!
//! The reference takes the eigenvectors of the mean `C` with eigenvalue
//! below an absolute `1e-2` (`2e-2` for Llama-3-8B), and kedit's default is
//! the same absolute `1e-2` ([`DEFAULT_THRESHOLD`]), because it fits
//! SmolLM2-135M's key scale too. Measured on its MEMIT window (layers 1–5,
//! WikiText, 1000 sequences; `cargo run --release --example memit_scale`):
//! the eigenvalues of `C` run from 1e-3 to 3e-3 at the bottom, with medians
//! of 4e-3 to 1e-2, and `1e-2` keeps 1232, 1109, 993, 799 and 740 of the
//! 1536 dimensions. A threshold relative to the largest eigenvalue
//! ([`NullSpaceThreshold::Relative`]) looks scale-free but is not usable
//! there: layer 2 has one outlier direction with eigenvalue 189 (against
//! about 1 at the other layers), so `1e-3 ×` the largest keeps 1527
//! dimensions at layer 2 and none at layers 3–5.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use faer::Mat;
use serde::{Deserialize, Serialize};

use super::memit::{default_layers, from_row_major, to_row_major};
use super::Editor;
use crate::linalg::{symmetric_eigen, SpdSolver};
use crate::model::ModelConfig;
use crate::stats::{second_moment, Corpus, StatsOptions};
use crate::{Error, Result};

/// Which eigenvalues of `C` count as "zero" (their eigenvectors span the
/// null space the update is confined to).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NullSpaceThreshold {
    /// Eigenvalues below this value (the reference code's rule).
    Absolute(f64),
    /// Eigenvalues below this fraction of the largest eigenvalue.
    Relative(f64),
}

impl NullSpaceThreshold {
    fn value(self, largest: f64) -> f64 {
        match self {
            NullSpaceThreshold::Absolute(t) => t,
            NullSpaceThreshold::Relative(r) => r * largest,
        }
    }

    fn tag(self) -> String {
        match self {
            NullSpaceThreshold::Absolute(t) => format!("abs{t:e}"),
            NullSpaceThreshold::Relative(r) => format!("rel{r:e}"),
        }
    }
}

/// AlphaEdit's hyper-parameters. Like MEMIT, the δ optimisation and the
/// statistics are the editor's [`super::RomeHParams`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlphaEditHParams {
    /// The blocks whose `mlp.w_out` are edited (distinct, ascending order).
    pub layers: Vec<usize>,
    /// Which eigenvectors of `C` span the null space.
    pub nullspace_threshold: NullSpaceThreshold,
    /// `α`, the ridge of the solve (`L2` in the reference configurations).
    pub l2: f64,
    /// Context templates of the targets and keys (MEMIT's by default,
    /// [`super::memit::batch_templates`]).
    #[serde(default = "super::memit::batch_templates")]
    pub context_templates: Vec<(usize, usize)>,
}

/// kedit's default null-space threshold: eigenvalues of the mean `C`
/// below `1e-2` (the reference's value; see the module documentation).
pub const DEFAULT_THRESHOLD: NullSpaceThreshold = NullSpaceThreshold::Absolute(1e-2);

impl AlphaEditHParams {
    /// Defaults: MEMIT's window of layers, [`DEFAULT_THRESHOLD`], `α = 10`
    /// (the reference configuration for Llama-3-8B).
    pub fn for_model(config: &ModelConfig) -> Self {
        Self {
            layers: default_layers(config),
            nullspace_threshold: DEFAULT_THRESHOLD,
            l2: 10.0,
            context_templates: super::memit::batch_templates(),
        }
    }

    /// Checks the numbers (the layers are checked with the model).
    pub fn validate(&self) -> Result<()> {
        let t = match self.nullspace_threshold {
            NullSpaceThreshold::Absolute(t) | NullSpaceThreshold::Relative(t) => t,
        };
        if !(t.is_finite() && t > 0.0) {
            return Err(Error::invalid(
                "nullspace_threshold",
                format!("{t} is not a finite number > 0"),
            ));
        }
        if !(self.l2.is_finite() && self.l2 > 0.0) {
            return Err(Error::invalid(
                "l2",
                format!("{} is not a finite number > 0", self.l2),
            ));
        }
        Ok(())
    }
}

/// An orthonormal basis of the (numerical) null space of a symmetric
/// positive semi-definite matrix: the projector is `P = B Bᵀ`.
#[derive(Debug, Clone)]
pub struct NullSpace {
    basis: Mat<f64>,
    /// The eigenvalue bound that was used (absolute).
    pub threshold: f64,
    /// The largest eigenvalue of the matrix.
    pub largest_eigenvalue: f64,
}

impl NullSpace {
    /// The null space of the row-major `n × n` matrix `c`: the eigenvectors
    /// whose eigenvalues are below `threshold`.
    pub fn from_second_moment(c: &[f64], n: usize, threshold: NullSpaceThreshold) -> Result<Self> {
        if c.iter().any(|x| !x.is_finite()) {
            return Err(Error::NonFinite("the key statistics".into()));
        }
        let (values, vectors) = symmetric_eigen(c, n)?;
        let largest = values.last().copied().unwrap_or(0.0);
        let bound = threshold.value(largest);
        let kept: Vec<usize> = (0..n).filter(|&i| values[i] < bound).collect();
        let basis = Mat::from_fn(n, kept.len(), |i, j| vectors[i * n + kept[j]]);
        Ok(Self {
            basis,
            threshold: bound,
            largest_eigenvalue: largest,
        })
    }

    /// The dimension of the null space.
    pub fn dim(&self) -> usize {
        self.basis.ncols()
    }

    /// The dimension of the whole space (`d_ff`).
    pub fn ambient_dim(&self) -> usize {
        self.basis.nrows()
    }

    /// The orthonormal basis, `[ambient_dim, dim]`.
    pub fn basis(&self) -> &Mat<f64> {
        &self.basis
    }

    /// `P x = B (Bᵀ x)`.
    pub fn project(&self, x: &[f64]) -> Result<Vec<f64>> {
        let n = self.ambient_dim();
        if x.len() != n {
            return Err(Error::invalid(
                "vector",
                format!("{} entries for a space of dimension {n}", x.len()),
            ));
        }
        let coords: Vec<f64> = (0..self.dim())
            .map(|j| (0..n).map(|i| self.basis[(i, j)] * x[i]).sum())
            .collect();
        Ok((0..n)
            .map(|i| {
                (0..self.dim())
                    .map(|j| self.basis[(i, j)] * coords[j])
                    .sum()
            })
            .collect())
    }
}

/// `B (α I + G Gᵀ)⁻¹ G₁` with `G = Bᵀ [earlier keys]`, `G₁ = Bᵀ keys`.
pub(super) fn alphaedit_right(
    null_space: &NullSpace,
    earlier: &Mat<f64>,
    keys: &Mat<f64>,
    l2: f64,
) -> Result<super::memit::Solved> {
    let b = null_space.basis();
    let dim = b.ncols();
    if dim == 0 {
        return Err(Error::invalid(
            "null space",
            "it is empty: no eigenvalue of C lies below the threshold; raise nullspace_threshold",
        ));
    }
    let g1 = b.transpose() * keys;
    let mut a = &g1 * g1.transpose();
    if earlier.ncols() > 0 {
        let gp = b.transpose() * earlier;
        a += &gp * gp.transpose();
    }
    for i in 0..dim {
        a[(i, i)] += l2;
    }
    let solver = SpdSolver::new(&to_row_major(&a), dim)?;
    let y = from_row_major(
        &solver.solve(&to_row_major(&g1), g1.ncols())?,
        dim,
        g1.ncols(),
    );
    Ok(super::memit::Solved {
        right: b * &y,
        whitened_key_norm: 0.0,
        ridge: solver.ridge,
    })
}

/// Null spaces kept in memory, with what they were made from.
pub(super) type NullSpaceCache =
    HashMap<usize, (Corpus, StatsOptions, NullSpaceThreshold, Arc<NullSpace>)>;

impl Editor {
    pub(super) fn null_space_is_cached(&self, layer: usize) -> bool {
        matches!(
            self.null_spaces.get(&layer),
            Some((c, o, t, _)) if *c == self.corpus && *o == self.hparams.stats
                && *t == self.alphaedit.nullspace_threshold
        )
    }

    /// The null space of a layer's key statistics under the AlphaEdit
    /// threshold: from memory, from its disk cache next to the statistics
    /// (when the statistics are cached), or computed (eigendecomposition).
    pub fn null_space(&mut self, layer: usize) -> Result<Arc<NullSpace>> {
        let n_layers = self.model.config().n_layers;
        if layer >= n_layers {
            return Err(Error::invalid(
                "layer",
                format!("{layer} is out of range: the model has {n_layers} layers"),
            ));
        }
        self.alphaedit.validate()?;
        if self.null_space_is_cached(layer) {
            return Ok(self.null_spaces[&layer].3.clone());
        }
        let opts = self.hparams.stats.clone();
        let threshold = self.alphaedit.nullspace_threshold;
        let corpus = self.corpus.clone();
        let stats = self.on_base_model(|model| second_moment(model, layer, &corpus, &opts))?;
        let d_ff = self.model.config().d_ff;
        let path = opts
            .cache_dir
            .clone()
            .unwrap_or_else(|| crate::fetch::cache_dir().join("stats"))
            .join(format!(
                "{}-null-{}.safetensors",
                stats.key,
                threshold.tag()
            ));
        let cached = if opts.use_cache && path.is_file() {
            match read_null_space(&path, &stats.key, threshold, d_ff) {
                Ok(ns) => Some(ns),
                Err(e) => {
                    eprintln!("kedit: ignoring a bad null-space cache, recomputing: {e}");
                    None
                }
            }
        } else {
            None
        };
        let ns = match cached {
            Some(ns) => ns,
            None => {
                let ns = NullSpace::from_second_moment(&stats.to_f64_vec()?, d_ff, threshold)?;
                if opts.use_cache {
                    write_null_space(&path, &stats.key, threshold, &ns)?;
                }
                ns
            }
        };
        let ns = Arc::new(ns);
        self.null_spaces
            .insert(layer, (self.corpus.clone(), opts, threshold, ns.clone()));
        Ok(ns)
    }

    /// The keys of the AlphaEdit edits in the journal at `layer`, `[d_ff, m]`.
    pub(super) fn alphaedit_keys(&self, layer: usize) -> Result<Mat<f64>> {
        let mut columns: Vec<Vec<f64>> = Vec::new();
        for (_, d) in self.edits() {
            if d.info.method != "alphaedit" {
                continue;
            }
            for l in d.layers.iter().filter(|l| l.layer == layer) {
                let k: Vec<Vec<f64>> = l.keys.to_dtype(DType::F64)?.t()?.to_vec2()?;
                columns.extend(k);
            }
        }
        let d_ff = self.model.config().d_ff;
        Ok(Mat::from_fn(d_ff, columns.len(), |i, j| columns[j][i]))
    }
}

fn write_null_space(
    path: &std::path::Path,
    key: &str,
    threshold: NullSpaceThreshold,
    ns: &NullSpace,
) -> Result<()> {
    let basis = Tensor::from_vec(
        to_row_major(&ns.basis),
        (ns.ambient_dim(), ns.dim()),
        &candle_core::Device::Cpu,
    )?;
    let meta = HashMap::from([
        ("format".to_string(), "kedit-nullspace-1".to_string()),
        ("key".to_string(), key.to_string()),
        (
            "threshold".to_string(),
            serde_json::to_string(&threshold).unwrap_or_default(),
        ),
        ("bound".to_string(), format!("{:e}", ns.threshold)),
        (
            "largest".to_string(),
            format!("{:e}", ns.largest_eigenvalue),
        ),
    ]);
    crate::io::write_safetensors(path, &[("basis", &basis)], meta)
}

fn read_null_space(
    path: &std::path::Path,
    key: &str,
    threshold: NullSpaceThreshold,
    d_ff: usize,
) -> Result<NullSpace> {
    let (tensors, meta) = crate::io::read_safetensors(path)?;
    let bad = |reason: String| Error::Format {
        path: PathBuf::from(path),
        format: "kedit null-space cache",
        reason,
    };
    if meta.get("key").map(String::as_str) != Some(key) {
        return Err(bad(format!("its key {:?} is not {key:?}", meta.get("key"))));
    }
    let stored: Option<NullSpaceThreshold> = meta
        .get("threshold")
        .and_then(|t| serde_json::from_str(t).ok());
    if stored != Some(threshold) {
        return Err(bad(format!(
            "its threshold {stored:?} is not {threshold:?}"
        )));
    }
    let num = |k: &str| -> Result<f64> {
        meta.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(format!("metadata {k} is missing")))
    };
    let basis = tensors
        .get("basis")
        .ok_or_else(|| bad("no tensor basis".into()))?;
    let (rows, dim) = basis
        .dims2()
        .map_err(|_| bad(format!("basis has shape {:?}", basis.dims())))?;
    if rows != d_ff {
        return Err(bad(format!("basis has {rows} rows, expected {d_ff}")));
    }
    let v: Vec<f64> = basis.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(bad("basis holds non-finite values".into()));
    }
    Ok(NullSpace {
        basis: from_row_major(&v, d_ff, dim),
        threshold: num("bound")?,
        largest_eigenvalue: num("largest")?,
    })
}
