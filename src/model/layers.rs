//! Building blocks of the canonical decoder, written with operations whose
//! backward pass candle implements.
//!
//! candle's fused kernels (`ops::rms_norm`, `ops::layer_norm`,
//! `softmax_last_dim`, `rotary_emb::rope*`) have no backward and cut the
//! gradient without an error, so none is used here: every path in the
//! decoder can carry a gradient to a hooked `Var`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Tensor, D};

use super::config::{Activation, NormKind, Rotary};
use crate::Result;

/// `y = x Wᵀ (+ b)` with a frozen `W` stored `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Applies the layer to `x` of shape `[.., in_features]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (in_features, rest) = dims
            .split_last()
            .expect("linear input has a last dimension");
        let rows: usize = rest.iter().product();
        let x2 = x.reshape((rows, *in_features))?.contiguous()?;
        // The custom op records a backward only when x carries a gradient.
        let y = x2.apply_op2(&self.weight.t()?, FrozenMatmul)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = rest.to_vec();
        out_dims.push(self.weight.dim(0)?);
        Ok(y.reshape(out_dims)?)
    }
}

/// Matrix product `x · Wᵀ` whose backward returns the gradient for `x` only.
///
/// candle's own matmul backward always computes the weight gradient too, which
/// for a frozen model is pure waste (DESIGN.md §9: 4.4× slower optimisation
/// steps). The second argument is `Wᵀ` as a strided view of `W`.
struct FrozenMatmul;

impl FrozenMatmul {
    fn dims(l1: &Layout, l2: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (m, k) = l1.shape().dims2()?;
        let (k2, n) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: inner dimensions differ ({k} vs {k2})");
        }
        Ok((m, k, n))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k, n) = Self::dims(l1, l2)?;
        Ok((s1.matmul(s2, (1, m, n, k), l1, l2)?, Shape::from((m, n))))
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (m, k, n) = Self::dims(l1, l2)?;
        Ok((s1.matmul(s2, (1, m, n, k), l1, l2)?, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w_t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // d(x Wᵀ)/dx = grad · W, and W = (Wᵀ)ᵀ.
        Ok((Some(grad.matmul(&w_t.t()?)?), None))
    }
}

/// LayerNorm or RMSNorm over the last dimension.
#[derive(Debug, Clone)]
pub struct Norm {
    /// LayerNorm or RMSNorm.
    pub kind: NormKind,
    /// Scale, `[d_model]`.
    pub weight: Tensor,
    /// Shift, `[d_model]` (LayerNorm only).
    pub bias: Option<Tensor>,
    /// Added to the variance.
    pub eps: f64,
}

impl Norm {
    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !x.track_op() && x.dtype() != candle_core::DType::F64 {
            // No gradient can flow through x: candle's fused kernels are exact
            // and faster.
            return Ok(match (self.kind, &self.bias) {
                (NormKind::RmsNorm, None) => {
                    candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)?
                }
                (NormKind::LayerNorm, Some(b)) => {
                    candle_nn::ops::layer_norm(x, &self.weight, b, self.eps as f32)?
                }
                _ => self.composite(x)?,
            });
        }
        self.composite(x)
    }

    fn composite(&self, x: &Tensor) -> Result<Tensor> {
        let normed = match self.kind {
            NormKind::LayerNorm => {
                let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
                centred.broadcast_div(&(var + self.eps)?.sqrt()?)?
            }
            NormKind::RmsNorm => {
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(ms + self.eps)?.sqrt()?)?
            }
        };
        let scaled = normed.broadcast_mul(&self.weight)?;
        Ok(match &self.bias {
            Some(b) => scaled.broadcast_add(b)?,
            None => scaled,
        })
    }
}

/// Applies the activation function.
pub fn activate(act: Activation, x: &Tensor) -> Result<Tensor> {
    Ok(match act {
        Activation::GeluTanh => x.gelu()?,
        Activation::Gelu => x.gelu_erf()?,
        Activation::Silu => x.silu()?,
        Activation::Relu => x.relu()?,
    })
}

/// Cosine and sine tables for rotary positions `start_r..start_r + len` of
/// every row `r`: `[len, rotary_dim / 2]` when all rows start at the same
/// position, else `[rows, 1, len, rotary_dim / 2]` (broadcast over heads).
pub fn rotary_tables(
    rotary: &Rotary,
    starts: &[usize],
    len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = rotary.rotary_dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| {
            let f = 1.0 / rotary.theta.powf(2.0 * i as f64 / rotary.rotary_dim as f64);
            match &rotary.llama3_scaling {
                Some(s) => llama3_scale(f, s),
                None => f,
            }
        })
        .collect();
    let uniform = starts.windows(2).all(|w| w[0] == w[1]);
    let rows: &[usize] = if uniform {
        &starts[..1.min(starts.len())]
    } else {
        starts
    };
    let mut cos = Vec::with_capacity(rows.len() * len * half);
    let mut sin = Vec::with_capacity(rows.len() * len * half);
    for &start in rows {
        for pos in start..start + len {
            for f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    if uniform {
        Ok((
            Tensor::from_vec(cos, (len, half), device)?,
            Tensor::from_vec(sin, (len, half), device)?,
        ))
    } else {
        let shape = (rows.len(), 1, len, half);
        Ok((
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        ))
    }
}

/// Llama 3's frequency-dependent rescaling of one inverse frequency.
fn llama3_scale(inv_freq: f64, s: &super::config::Llama3RopeScaling) -> f64 {
    let old_ctx = s.original_max_position_embeddings as f64;
    let low_wavelen = old_ctx / s.low_freq_factor;
    let high_wavelen = old_ctx / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
    if wavelen < high_wavelen {
        inv_freq
    } else if wavelen > low_wavelen {
        inv_freq / s.factor
    } else {
        let smooth =
            (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * inv_freq / s.factor + smooth * inv_freq
    }
}

/// Rotates the first `rotary_dim` dimensions of each head of `x`
/// (`[batch, heads, seq, head_dim]`) in the half-split convention; the
/// remaining dimensions pass through.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor, rotary_dim: usize) -> Result<Tensor> {
    let head_dim = x.dim(D::Minus1)?;
    let half = rotary_dim / 2;
    let rot = x.narrow(D::Minus1, 0, rotary_dim)?;
    let x1 = rot.narrow(D::Minus1, 0, half)?;
    let x2 = rot.narrow(D::Minus1, half, half)?;
    let cos = cos.to_dtype(x.dtype())?;
    let sin = sin.to_dtype(x.dtype())?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    if rotary_dim == head_dim {
        Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
    } else {
        let pass = x.narrow(D::Minus1, rotary_dim, head_dim - rotary_dim)?;
        Ok(Tensor::cat(&[r1, r2, pass], D::Minus1)?)
    }
}

/// Additive attention mask for `q_len` new columns after `cached` columns
/// of keys already in a cache, where row `r` starts with `pads[r]` padding
/// columns: 0 where a query may attend a key, −∞ elsewhere. Shape
/// `[q_len, cached + q_len]` when no row is padded, else
/// `[rows, 1, q_len, cached + q_len]`; `None` when nothing is masked.
pub fn attention_mask(
    q_len: usize,
    cached: usize,
    pads: &[usize],
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let k_len = cached + q_len;
    let padded = pads.iter().any(|&p| p > 0);
    let windowed = window.is_some_and(|w| k_len > w);
    if q_len == 1 && !padded && !windowed {
        return Ok(None);
    }
    let rows: &[usize] = if padded { pads } else { &[0] };
    let mut mask = Vec::with_capacity(rows.len() * q_len * k_len);
    for &pad in rows {
        for i in 0..q_len {
            let q_col = cached + i;
            for c in 0..k_len {
                // Position differences do not depend on the padding.
                let visible = c >= pad && c <= q_col && window.is_none_or(|w| q_col - c < w);
                mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    if padded {
        Ok(Some(Tensor::from_vec(
            mask,
            (rows.len(), 1, q_len, k_len),
            device,
        )?))
    } else {
        Ok(Some(Tensor::from_vec(mask, (q_len, k_len), device)?))
    }
}

/// Softmax over the last dimension from differentiable primitives.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    if x.track_op() || x.dtype() == candle_core::DType::F64 {
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(x)?)
    }
}
