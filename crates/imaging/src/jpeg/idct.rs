//! Scaled inverse DCT: an 8×8 block of coefficients to K×K pixels, K = 8, 4, 2 or 1.
//!
//! Decoding at 1/2, 1/4 or 1/8 scale runs a K-point IDCT on the K×K lowest frequencies: with
//! JPEG's orthonormal scaling the basis is the same `C(u)/2 · cos((2i+1)uπ / 2K)` for every K,
//! and the result is the block averaged over (8/K)×(8/K) pixels, band-limited — the libvips
//! "shrink-on-load" trick, done here in the DCT domain so the dropped frequencies are never
//! stored or transformed.
//!
//! The transform is separable, in f32, written so the compiler vectorises the inner loops over a
//! row, and skips coefficient rows that are all zero (most of them in photos).

/// `basis[i][u] = C(u)/2 · cos((2i+1)uπ / 2K)` with `C(0) = 1/√2`.
fn basis<const K: usize>() -> [[f32; K]; K] {
    let mut b = [[0f32; K]; K];
    for (i, row) in b.iter_mut().enumerate() {
        for (u, v) in row.iter_mut().enumerate() {
            let c = if u == 0 { std::f64::consts::FRAC_1_SQRT_2 } else { 1.0 };
            *v = (c / 2.0 * (((2 * i + 1) * u) as f64 * std::f64::consts::PI / (2 * K) as f64).cos()) as f32;
        }
    }
    b
}

/// The IDCT for one output size, `KW` × `KH` (different across and down when chroma is
/// subsampled in one direction only), with its bases computed once.
pub(super) struct Idct<const KW: usize, const KH: usize> {
    across: [[f32; KW]; KW],
    down: [[f32; KH]; KH],
}

impl<const KW: usize, const KH: usize> Idct<KW, KH> {
    pub(super) fn new() -> Idct<KW, KH> {
        Idct { across: basis::<KW>(), down: basis::<KH>() }
    }

    /// `coefs` holds the KH rows × KW columns of kept coefficients, row-major, `quant` the
    /// matching dequantisation factors. Writes KH rows of KW pixels at `out`, `stride` apart.
    // Index loops over fixed-size arrays: the shape the compiler unrolls and vectorises.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    pub(super) fn block(&self, coefs: &[i16], quant: &[f32], out: &mut [u8], stride: usize) {
        // A flat block (only DC), common in smooth areas: one value everywhere.
        if coefs[1..KW * KH].iter().all(|&c| c == 0) {
            let v = (f32::from(coefs[0]) * quant[0] * self.across[0][0] * self.down[0][0] + 128.5) as u8;
            for i in 0..KH {
                out[i * stride..i * stride + KW].fill(v);
            }
            return;
        }
        // Pass 1, along each row u: tmp[u][j] = Σ_v F[u][v] · across[j][v].
        let mut tmp = [[0f32; KW]; KH];
        let mut live = [false; KH];
        for u in 0..KH {
            let row = &coefs[u * KW..u * KW + KW];
            if row.iter().all(|&c| c == 0) {
                continue;
            }
            live[u] = true;
            let mut f = [0f32; KW];
            for v in 0..KW {
                f[v] = f32::from(row[v]) * quant[u * KW + v];
            }
            for j in 0..KW {
                let mut acc = 0f32;
                for v in 0..KW {
                    acc += f[v] * self.across[j][v];
                }
                tmp[u][j] = acc;
            }
        }
        // Pass 2, down each column: out[i][j] = Σ_u down[i][u] · tmp[u][j], plus the level shift.
        let mut acc = [[128.5f32; KW]; KH];
        for u in 0..KH {
            if !live[u] {
                continue;
            }
            for i in 0..KH {
                let w = self.down[i][u];
                for j in 0..KW {
                    acc[i][j] += w * tmp[u][j];
                }
            }
        }
        for i in 0..KH {
            let dst = &mut out[i * stride..i * stride + KW];
            for j in 0..KW {
                // `as u8` saturates, and truncating x + 0.5 rounds.
                dst[j] = acc[i][j] as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward DCT of T.81 A.3.3, for reference.
    fn fdct(px: &[[f64; 8]; 8]) -> [[f64; 8]; 8] {
        let mut f = [[0f64; 8]; 8];
        for (u, frow) in f.iter_mut().enumerate() {
            for (v, fv) in frow.iter_mut().enumerate() {
                let cu = if u == 0 { std::f64::consts::FRAC_1_SQRT_2 } else { 1.0 };
                let cv = if v == 0 { std::f64::consts::FRAC_1_SQRT_2 } else { 1.0 };
                let mut s = 0.0;
                for (y, prow) in px.iter().enumerate() {
                    for (x, p) in prow.iter().enumerate() {
                        s += (p - 128.0)
                            * (((2 * y + 1) * u) as f64 * std::f64::consts::PI / 16.0).cos()
                            * (((2 * x + 1) * v) as f64 * std::f64::consts::PI / 16.0).cos();
                    }
                }
                *fv = cu * cv / 4.0 * s;
            }
        }
        f
    }

    fn sample_block() -> [[f64; 8]; 8] {
        let mut px = [[0f64; 8]; 8];
        for (y, row) in px.iter_mut().enumerate() {
            for (x, p) in row.iter_mut().enumerate() {
                *p = 40.0 + 20.0 * x as f64 + 9.0 * y as f64 + if (x + y) % 3 == 0 { 6.0 } else { 0.0 };
            }
        }
        px
    }

    fn kept<const KW: usize, const KH: usize>(f: &[[f64; 8]; 8]) -> (Vec<i16>, Vec<f32>) {
        let mut coefs = vec![0i16; KW * KH];
        for u in 0..KH {
            for v in 0..KW {
                coefs[u * KW + v] = f[u][v].round() as i16;
            }
        }
        (coefs, vec![1.0; KW * KH])
    }

    #[test]
    fn full_size_inverts_the_forward_transform() {
        let px = sample_block();
        let (coefs, quant) = kept::<8, 8>(&fdct(&px));
        let mut out = [0u8; 64];
        Idct::<8, 8>::new().block(&coefs, &quant, &mut out, 8);
        for y in 0..8 {
            for x in 0..8 {
                assert!((f64::from(out[y * 8 + x]) - px[y][x]).abs() <= 1.0, "({x},{y}): {} vs {}", out[y * 8 + x], px[y][x]);
            }
        }
    }

    #[test]
    fn reduced_sizes_give_the_block_averages() {
        let px = sample_block();
        let f = fdct(&px);
        let mean = |x0: usize, y0: usize, n: usize| {
            let mut s = 0.0;
            for row in px.iter().skip(y0).take(n) {
                s += row.iter().skip(x0).take(n).sum::<f64>();
            }
            s / (n * n) as f64
        };
        let (coefs, quant) = kept::<1, 1>(&f);
        let mut one = [0u8; 1];
        Idct::<1, 1>::new().block(&coefs, &quant, &mut one, 1);
        assert!((f64::from(one[0]) - mean(0, 0, 8)).abs() <= 1.0);
        let (coefs, quant) = kept::<4, 4>(&f);
        let mut four = [0u8; 16];
        Idct::<4, 4>::new().block(&coefs, &quant, &mut four, 4);
        for y in 0..4 {
            for x in 0..4 {
                // A smooth ramp: the band-limited half-size block is close to the 2×2 averages.
                assert!(
                    (f64::from(four[y * 4 + x]) - mean(2 * x, 2 * y, 2)).abs() <= 4.0,
                    "({x},{y}): {} vs {}",
                    four[y * 4 + x],
                    mean(2 * x, 2 * y, 2)
                );
            }
        }
        // 8 across, 4 down (4:2:2 chroma at half scale): each pixel averages two rows.
        let (coefs, quant) = kept::<8, 4>(&f);
        let mut wide = [0u8; 32];
        Idct::<8, 4>::new().block(&coefs, &quant, &mut wide, 8);
        for y in 0..4 {
            for x in 0..8 {
                let m = (px[2 * y][x] + px[2 * y + 1][x]) / 2.0;
                assert!((f64::from(wide[y * 8 + x]) - m).abs() <= 6.0, "({x},{y}): {} vs {m}", wide[y * 8 + x]);
            }
        }
    }

    #[test]
    fn saturates_instead_of_wrapping() {
        let mut coefs = [0i16; 4];
        coefs[0] = 2000; // far above white
        let mut out = [0u8; 4];
        Idct::<2, 2>::new().block(&coefs, &[1.0; 4], &mut out, 2);
        assert_eq!(out, [255; 4]);
        coefs[0] = -2000;
        Idct::<2, 2>::new().block(&coefs, &[1.0; 4], &mut out, 2);
        assert_eq!(out, [0; 4]);
    }
}
