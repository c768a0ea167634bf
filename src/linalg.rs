//! Dense linear algebra in f64 through faer: Cholesky solves and symmetric
//! eigendecompositions of the d_ff × d_ff key statistics.

use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

use crate::{Error, Result};

/// A symmetric positive-definite matrix, factorised once (Cholesky) and
/// reused for every solve against it.
pub struct SpdSolver {
    n: usize,
    llt: faer::linalg::solvers::Llt<f64>,
    /// Ridge added to the diagonal to make the factorisation succeed (0 if none).
    pub ridge: f64,
}

impl std::fmt::Debug for SpdSolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpdSolver(n = {}, ridge = {:e})", self.n, self.ridge)
    }
}

impl SpdSolver {
    /// Factorises the row-major `n × n` matrix `a`. If it is not numerically
    /// positive definite, a ridge of growing size (starting at 1e-10 of the
    /// mean diagonal) is added until it is, and recorded in [`Self::ridge`].
    pub fn new(a: &[f64], n: usize) -> Result<Self> {
        if a.len() != n * n {
            return Err(Error::invalid(
                "matrix",
                format!("{} entries for {n} × {n}", a.len()),
            ));
        }
        if a.iter().any(|x| !x.is_finite()) {
            return Err(Error::NonFinite("matrix to factorise".into()));
        }
        let mean_diag = (0..n).map(|i| a[i * n + i]).sum::<f64>() / n as f64;
        let mut ridge = 0.0;
        for _ in 0..12 {
            let m = Mat::from_fn(n, n, |i, j| a[i * n + j] + if i == j { ridge } else { 0.0 });
            if let Ok(llt) = m.llt(Side::Lower) {
                return Ok(Self { n, llt, ridge });
            }
            ridge = if ridge == 0.0 {
                mean_diag.abs().max(1e-30) * 1e-10
            } else {
                ridge * 10.0
            };
        }
        Err(Error::invalid(
            "matrix",
            "it is not positive definite even with a ridge",
        ))
    }

    /// Solves `A X = B` for a row-major `n × m` right-hand side.
    pub fn solve(&self, b: &[f64], m: usize) -> Result<Vec<f64>> {
        let n = self.n;
        if b.len() != n * m {
            return Err(Error::invalid(
                "right-hand side",
                format!("{} entries for {n} × {m}", b.len()),
            ));
        }
        let rhs = Mat::from_fn(n, m, |i, j| b[i * m + j]);
        let x = self.llt.solve(&rhs);
        let mut out = vec![0.0; n * m];
        for i in 0..n {
            for j in 0..m {
                out[i * m + j] = x[(i, j)];
            }
        }
        Ok(out)
    }
}

/// Eigenvalues (ascending) and eigenvectors (columns, row-major `n × n`) of a
/// symmetric row-major matrix.
pub fn symmetric_eigen(a: &[f64], n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    if a.len() != n * n {
        return Err(Error::invalid(
            "matrix",
            format!("{} entries for {n} × {n}", a.len()),
        ));
    }
    let m = Mat::from_fn(n, n, |i, j| a[i * n + j]);
    let evd = m
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::invalid("matrix", format!("eigendecomposition failed: {e:?}")))?;
    let s = evd.S();
    let u = evd.U();
    let values: Vec<f64> = (0..n).map(|i| s[i]).collect();
    let mut vectors = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            vectors[i * n + j] = u[(i, j)];
        }
    }
    Ok((values, vectors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_known_system() {
        // A = [[4, 2], [2, 3]], x = [1, -1] → b = [2, -1].
        let s = SpdSolver::new(&[4.0, 2.0, 2.0, 3.0], 2).unwrap();
        let x = s.solve(&[2.0, -1.0], 1).unwrap();
        assert!(
            (x[0] - 1.0).abs() < 1e-12 && (x[1] + 1.0).abs() < 1e-12,
            "{x:?}"
        );
        assert_eq!(s.ridge, 0.0);
    }

    #[test]
    fn singular_matrix_gets_a_small_ridge() {
        let s = SpdSolver::new(&[1.0, 1.0, 1.0, 1.0], 2).unwrap();
        assert!(s.ridge > 0.0 && s.ridge < 1e-3, "{}", s.ridge);
    }

    #[test]
    fn eigen_of_a_diagonal_matrix() {
        let (vals, vecs) = symmetric_eigen(&[3.0, 0.0, 0.0, 1.0], 2).unwrap();
        assert_eq!(vals, vec![1.0, 3.0]);
        assert!((vecs[1].abs() - 1.0).abs() < 1e-12); // eigenvector of 1 is e2
    }
}
