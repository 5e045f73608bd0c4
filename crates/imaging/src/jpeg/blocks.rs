//! Decoding one block's coefficients from the entropy-coded data: sequential (baseline) blocks
//! and the four kinds of progressive scans (T.81 G.1.2).
//!
//! Only the K×K lowest frequencies are stored (`Keep`); the others are decoded, to stay in step
//! with the bit stream, and dropped. Progressive refinement must know which coefficients are
//! already non-zero, including dropped ones, so each block also carries a 64-bit mask of them
//! in zig-zag order.

use super::huffman::{BitReader, HuffmanTable};

/// Natural (row-major) position of the zig-zag index.
pub(super) const ZIGZAG: [u8; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56,
    57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// Where each zig-zag coefficient is stored in a block that keeps `kh` rows × `kw` columns of
/// frequencies. A stored block is `kw·kh + 1` values long: the last one is scratch, where dropped
/// coefficients go, so that storing never branches on whether a coefficient is kept.
pub(super) struct Keep {
    slot: [u8; 64],
    /// Zig-zag positions up to the last stored one; refinement bits past it are only skipped.
    low: u64,
}

impl Keep {
    pub(super) fn new(kw: usize, kh: usize) -> Keep {
        let scratch = (kw * kh) as u8;
        let mut slot = [scratch; 64];
        let mut last = 0;
        for (z, s) in slot.iter_mut().enumerate() {
            let natural = usize::from(ZIGZAG[z]);
            let (row, col) = (natural / 8, natural % 8);
            if row < kh && col < kw {
                *s = (row * kw + col) as u8;
                last = z;
            }
        }
        Keep { slot, low: u64::MAX >> (63 - last) }
    }

    /// Values stored per block, scratch included.
    pub(super) fn stride(kw: usize, kh: usize) -> usize {
        kw * kh + 1
    }

    #[inline(always)]
    fn set(&self, block: &mut [i16], z: usize, value: i32) {
        if let Some(c) = block.get_mut(usize::from(self.slot[z & 63])) {
            *c = value as i16;
        }
    }
}

type Result<T> = std::result::Result<T, String>;

/// The DC difference that starts every block of a sequential or first DC scan.
#[inline(always)]
fn dc_difference(r: &mut BitReader<'_>, dc: &HuffmanTable) -> Result<i32> {
    let size = u32::from(r.decode(dc)?);
    if size > 16 {
        return Err(format!("DC difference of {size} bits"));
    }
    Ok(if size == 16 { 32768 } else { r.receive_extend(size) })
}

/// A whole sequential block: DC difference, then AC run/size codes up to EOB. `block` must be zero.
#[inline(never)]
pub(super) fn sequential(
    r: &mut BitReader<'_>,
    dc: &HuffmanTable,
    ac: &HuffmanTable,
    pred: &mut i32,
    block: &mut [i16],
    keep: &Keep,
) -> Result<()> {
    *pred = pred.wrapping_add(dc_difference(r, dc)?);
    keep.set(block, 0, *pred);
    let mut k = 1usize;
    while k < 64 {
        let (run, value) = r.decode_ac(ac)?;
        if value != 0 {
            k += run as usize;
            if k > 63 {
                return Err("AC coefficients run past the end of the block".into());
            }
            keep.set(block, k, value);
            k += 1;
        } else if run == 15 {
            k += 16;
        } else {
            break;
        }
    }
    Ok(())
}

/// DC, first scan: the difference, shifted up by the point transform `al`.
#[inline(never)]
pub(super) fn dc_first(r: &mut BitReader<'_>, dc: &HuffmanTable, pred: &mut i32, block: &mut [i16], al: u32) -> Result<()> {
    *pred = pred.wrapping_add(dc_difference(r, dc)?);
    if let Some(c) = block.first_mut() {
        *c = pred.wrapping_shl(al) as i16;
    }
    Ok(())
}

/// DC, refinement: one more bit of precision.
#[inline(always)]
pub(super) fn dc_refine(r: &mut BitReader<'_>, block: &mut [i16], al: u32) {
    if r.bit()
        && let Some(c) = block.first_mut()
    {
        *c |= (1i32 << al) as i16;
    }
}

/// The band `ss..=se` of a progressive scan, with its point transform and end-of-band run.
pub(super) struct Band {
    pub ss: usize,
    pub se: usize,
    pub al: u32,
}

/// AC, first scan of a band.
#[inline(never)]
pub(super) fn ac_first(
    r: &mut BitReader<'_>,
    ac: &HuffmanTable,
    band: &Band,
    eobrun: &mut u32,
    block: &mut [i16],
    nonzero: &mut u64,
    keep: &Keep,
) -> Result<()> {
    if *eobrun > 0 {
        *eobrun -= 1;
        return Ok(());
    }
    let mut k = band.ss;
    while k <= band.se {
        let (run, value) = r.decode_ac(ac)?;
        if value != 0 {
            k += run as usize;
            if k > band.se {
                return Err("AC coefficients run past the end of the band".into());
            }
            keep.set(block, k, value.wrapping_shl(band.al));
            *nonzero |= 1 << k;
            k += 1;
        } else if run == 15 {
            k += 16;
        } else {
            *eobrun = (1u32 << run) - 1;
            if run > 0 {
                *eobrun += r.bits(run);
            }
            break;
        }
    }
    Ok(())
}

/// AC, refinement scan of a band: a correction bit for every coefficient already non-zero, and
/// new coefficients of magnitude `1 << al`. The bits of the already non-zero coefficients are
/// found from the mask and read together.
#[inline(never)]
pub(super) fn ac_refine(
    r: &mut BitReader<'_>,
    ac: &HuffmanTable,
    band: &Band,
    eobrun: &mut u32,
    block: &mut [i16],
    nonzero: &mut u64,
    keep: &Keep,
) -> Result<()> {
    let p1 = (1i32 << band.al) as i16;
    let band_mask = (u64::MAX >> (63 - band.se)) & (u64::MAX << band.ss);
    let mut k = band.ss;
    if *eobrun == 0 {
        while k <= band.se {
            let (run, value) = r.decode_ac(ac)?;
            let new = match value {
                0 if run != 15 => {
                    *eobrun = 1u32 << run;
                    if run > 0 {
                        *eobrun += r.bits(run);
                    }
                    break;
                }
                0 => 0,
                v if v > 0 => p1,
                _ => -p1,
            };
            // Skip `run` zero coefficients (correcting the non-zero ones passed on the way) and
            // stop on the next zero one, where the new coefficient goes.
            let mut zeros = !*nonzero & band_mask & (u64::MAX << k);
            for _ in 0..run {
                zeros &= zeros.wrapping_sub(1);
            }
            let stop = if zeros == 0 { band.se + 1 } else { zeros.trailing_zeros() as usize };
            let passed = *nonzero & band_mask & (u64::MAX << k) & !(u64::MAX.checked_shl(stop as u32).unwrap_or(0));
            apply_corrections(r, block, passed, keep, p1);
            if stop > band.se {
                // Ran off the band (a corrupt stream): libjpeg drops the coefficient too.
                k = stop;
                break;
            }
            if new != 0 {
                keep.set(block, stop, i32::from(new));
                *nonzero |= 1 << stop;
            }
            k = stop + 1;
        }
    }
    if *eobrun > 0 {
        let rest = *nonzero & band_mask & (u64::MAX.checked_shl(k as u32).unwrap_or(0));
        apply_corrections(r, block, rest, keep, p1);
        *eobrun -= 1;
    }
    Ok(())
}

/// Reads one correction bit for each coefficient in `set` (a zig-zag mask), in order: a 1 adds
/// `p1` to the coefficient's magnitude. Branch-free per coefficient (the bits are random, so a
/// branch would mispredict half the time), and the bits of coefficients past the last stored one
/// are skipped in one go.
#[inline(always)]
fn apply_corrections(r: &mut BitReader<'_>, block: &mut [i16], set: u64, keep: &Keep, p1: i16) {
    let mut m = set & keep.low;
    while m != 0 {
        let z = m.trailing_zeros() as usize;
        m &= m - 1;
        let bit = i16::from(r.bit());
        if let Some(c) = block.get_mut(usize::from(keep.slot[z])) {
            let sign = (*c >> 15) | 1;
            *c = c.wrapping_add(sign.wrapping_mul(bit).wrapping_mul(p1));
        }
    }
    r.skip((set & !keep.low).count_ones());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_maps_low_frequencies_only() {
        let keep = Keep::new(2, 2);
        let mut block = [0i16; 5];
        for z in (0..64).rev() {
            keep.set(&mut block, z, z as i32 + 100);
        }
        // Zig-zag 0 → (0,0), 1 → (0,1), 2 → (1,0), 4 → (1,1); the rest went to scratch.
        assert_eq!(block[..4], [100, 101, 102, 104]);
        assert_eq!(keep.low, 0b11111);
        let all = Keep::new(8, 8);
        assert_eq!(all.low, u64::MAX);
        let mut full = [0i16; 65];
        for z in 0..64 {
            all.set(&mut full, z, z as i32);
        }
        for z in 0..64 {
            assert_eq!(full[usize::from(ZIGZAG[z])], z as i16);
        }
    }
}
