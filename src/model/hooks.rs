//! Hook points of the canonical decoder.
//!
//! A [`Hooks`] value lists what to do at which [`Site`] for which (batch row,
//! position) pairs: capture the activation, replace it, add to it (a candle
//! `Var` works, so gradients reach it), or add seeded Gaussian noise. The
//! same forward pass serves tracing, statistics, optimisation and generation.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// A place in the decoder where activations can be observed or changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// Token embeddings, before any position embedding is added. `[.., d_model]`
    Embed,
    /// The residual stream entering block `l`. `[.., d_model]`
    ResidPre(usize),
    /// The attention output of block `l` (after the output projection and its bias). `[.., d_model]`
    AttnOut(usize),
    /// The input of block `l`'s `mlp.w_out`: the activated hidden layer. `[.., d_ff]`
    MlpKey(usize),
    /// The output of block `l`'s MLP (`w_out` applied, bias included). `[.., d_model]`
    MlpOut(usize),
    /// The residual stream leaving block `l`. `[.., d_model]`
    ResidPost(usize),
}

impl Site {
    /// The block the site belongs to (`None` for [`Site::Embed`]).
    pub fn layer(self) -> Option<usize> {
        match self {
            Site::Embed => None,
            Site::ResidPre(l)
            | Site::AttnOut(l)
            | Site::MlpKey(l)
            | Site::MlpOut(l)
            | Site::ResidPost(l) => Some(l),
        }
    }
}

/// Which activations of a `[batch, seq, width]` site a hook touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    /// Every row and position. Captures and values have shape `[batch, seq, width]`.
    All,
    /// Explicit `(row, position)` pairs, without repeats. Captures and values
    /// have shape `[n_points, width]`, in the order given.
    Points(Vec<(usize, usize)>),
}

impl At {
    /// Every position of one row.
    pub fn row(row: usize, len: usize) -> Self {
        At::Points((0..len).map(|p| (row, p)).collect())
    }

    /// One position of one row.
    pub fn point(row: usize, pos: usize) -> Self {
        At::Points(vec![(row, pos)])
    }
}

/// What a hook does.
#[derive(Debug, Clone)]
pub enum Action {
    /// Record the activation; it is returned in [`super::Forward::captures`].
    Capture,
    /// Overwrite the activation with this tensor (broadcastable to the hook's shape).
    Replace(Tensor),
    /// Add this tensor (broadcastable to the hook's shape). It may be a `Var`
    /// or depend on one; gradients flow into it.
    Add(Tensor),
    /// Add Gaussian noise `N(0, std²)` drawn from a generator seeded with `seed`.
    Noise {
        /// Standard deviation.
        std: f64,
        /// Seed of the generator.
        seed: u64,
    },
}

/// One hook: a site, the activations it touches and what it does.
#[derive(Debug, Clone)]
pub struct Hook {
    /// Where.
    pub site: Site,
    /// Which rows and positions.
    pub at: At,
    /// What.
    pub action: Action,
}

/// A set of hooks for one forward pass. Hooks at the same site run in the
/// order they were added; a capture sees the effect of earlier hooks.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    hooks: Vec<Hook>,
    n_captures: usize,
}

/// Index of a capture inside [`super::Forward::captures`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureId(pub usize);

impl Hooks {
    /// No hooks: a plain forward pass.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the activation at `site`.
    pub fn capture(&mut self, site: Site, at: At) -> CaptureId {
        self.hooks.push(Hook {
            site,
            at,
            action: Action::Capture,
        });
        self.n_captures += 1;
        CaptureId(self.n_captures - 1)
    }

    /// Replaces the activation at `site` with `value`.
    pub fn replace(&mut self, site: Site, at: At, value: Tensor) -> &mut Self {
        self.push(site, at, Action::Replace(value))
    }

    /// Adds `value` to the activation at `site`.
    pub fn add(&mut self, site: Site, at: At, value: Tensor) -> &mut Self {
        self.push(site, at, Action::Add(value))
    }

    /// Adds seeded Gaussian noise of standard deviation `std` at `site`.
    pub fn noise(&mut self, site: Site, at: At, std: f64, seed: u64) -> &mut Self {
        self.push(site, at, Action::Noise { std, seed })
    }

    fn push(&mut self, site: Site, at: At, action: Action) -> &mut Self {
        self.hooks.push(Hook { site, at, action });
        self
    }

    /// All hooks, in order.
    pub fn hooks(&self) -> &[Hook] {
        &self.hooks
    }

    /// Number of captures the forward pass will return.
    pub fn n_captures(&self) -> usize {
        self.n_captures
    }

    /// True when no hook touches `site`.
    pub(crate) fn is_idle(&self, site: Site) -> bool {
        !self.hooks.iter().any(|h| h.site == site)
    }

    /// Checks every hook against the model and batch shape before any work is done.
    pub(crate) fn validate(&self, n_layers: usize, batch: usize, seq: &[usize]) -> Result<()> {
        for hook in &self.hooks {
            if let Some(l) = hook.site.layer() {
                if l >= n_layers {
                    return Err(Error::invalid(
                        format!("hook site {:?}", hook.site),
                        format!("layer {l} is out of range: the model has {n_layers} layers"),
                    ));
                }
            }
            if let At::Points(points) = &hook.at {
                if points.is_empty() {
                    return Err(Error::invalid(
                        format!("hook at {:?}", hook.site),
                        "an empty list of points",
                    ));
                }
                let mut seen = std::collections::HashSet::new();
                for &(row, pos) in points {
                    if row >= batch {
                        return Err(Error::invalid(
                            format!("hook at {:?}", hook.site),
                            format!("row {row} is out of range: the batch has {batch} rows"),
                        ));
                    }
                    if pos >= seq[row] {
                        return Err(Error::invalid(
                            format!("hook at {:?}", hook.site),
                            format!(
                                "position {pos} is out of range: row {row} has {} tokens",
                                seq[row]
                            ),
                        ));
                    }
                    if !seen.insert((row, pos)) {
                        return Err(Error::invalid(
                            format!("hook at {:?}", hook.site),
                            format!("point ({row}, {pos}) is listed twice"),
                        ));
                    }
                }
            }
            if let Action::Noise { std, .. } = hook.action {
                if !(std.is_finite() && std >= 0.0) {
                    return Err(Error::invalid(
                        format!("noise hook at {:?}", hook.site),
                        format!("standard deviation {std} must be finite and ≥ 0"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Runs every hook registered at `site` on `x` (`[batch, seq, width]`),
    /// storing captures into `captures` by their id. `seq_offset` is the
    /// absolute position of `x`'s first column (non-zero with a KV cache).
    pub(crate) fn apply(
        &self,
        site: Site,
        mut x: Tensor,
        seq_offset: usize,
        captures: &mut [Option<Tensor>],
    ) -> Result<Tensor> {
        let mut capture_index = 0;
        for hook in &self.hooks {
            let is_capture = matches!(hook.action, Action::Capture);
            if hook.site != site {
                capture_index += is_capture as usize;
                continue;
            }
            let (b, t, width) = x.dims3()?;
            match &hook.at {
                At::All => {
                    x = match &hook.action {
                        Action::Capture => {
                            captures[capture_index] = Some(x.clone());
                            x
                        }
                        Action::Replace(v) => v.broadcast_as((b, t, width))?.to_dtype(x.dtype())?,
                        Action::Add(v) => x.broadcast_add(&v.to_dtype(x.dtype())?)?,
                        Action::Noise { std, seed } => {
                            let noise = gaussian(&[b, t, width], *std, *seed, x.device())?
                                .to_dtype(x.dtype())?;
                            (x + noise)?
                        }
                    };
                }
                At::Points(points) => {
                    // Points refer to absolute positions; with a KV cache only
                    // those inside this call's window are touched.
                    let local: Vec<(usize, u32)> = points
                        .iter()
                        .enumerate()
                        .filter(|(_, &(_, p))| p >= seq_offset && p < seq_offset + t)
                        .map(|(i, &(r, p))| (i, (r * t + p - seq_offset) as u32))
                        .collect();
                    if local.is_empty() {
                        capture_index += is_capture as usize;
                        continue;
                    }
                    let n = points.len();
                    let flat_ids: Vec<u32> = local.iter().map(|&(_, f)| f).collect();
                    let ids = Tensor::new(flat_ids.as_slice(), x.device())?;
                    let flat = x.reshape((b * t, width))?;
                    // Values given for all points; keep the rows of those in this window.
                    let pick = |v: &Tensor| -> Result<Tensor> {
                        let v = v.broadcast_as((n, width))?.to_dtype(x.dtype())?;
                        if local.len() == n {
                            Ok(v)
                        } else {
                            let which: Vec<u32> = local.iter().map(|&(i, _)| i as u32).collect();
                            Ok(v.index_select(&Tensor::new(which.as_slice(), x.device())?, 0)?)
                        }
                    };
                    let flat = match &hook.action {
                        Action::Capture => {
                            captures[capture_index] = Some(flat.index_select(&ids, 0)?);
                            flat
                        }
                        Action::Replace(v) => {
                            // x + (v - x) at the points; the gradient to x there is zero.
                            let current = flat.index_select(&ids, 0)?;
                            let diff = (pick(v)? - current)?;
                            flat.index_add(&ids, &diff, 0)?
                        }
                        Action::Add(v) => flat.index_add(&ids, &pick(v)?, 0)?,
                        Action::Noise { std, seed } => {
                            let noise = gaussian(&[n, width], *std, *seed, x.device())?;
                            flat.index_add(&ids, &pick(&noise)?, 0)?
                        }
                    };
                    x = flat.reshape((b, t, width))?;
                }
            }
            capture_index += is_capture as usize;
        }
        Ok(x)
    }
}

/// Seeded standard-normal samples scaled by `std`, as f32 on `device`.
///
/// Generated on the host with SplitMix64 and Box–Muller so that the same seed
/// gives the same numbers on every device and platform.
pub fn gaussian(shape: &[usize], std: f64, seed: u64, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut state = seed;
    let mut next_unit = move || {
        // SplitMix64 (Steele, Lea & Flood 2014), mapped to (0, 1].
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let mut values = Vec::with_capacity(n);
    while values.len() < n {
        let (u1, u2) = (next_unit(), next_unit());
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * u2;
        values.push((std * radius * angle.cos()) as f32);
        if values.len() < n {
            values.push((std * radius * angle.sin()) as f32);
        }
    }
    Ok(Tensor::from_vec(values, shape, device)?.to_dtype(DType::F32)?)
}
