//! From decoded component rows to RGB: YCbCr (JFIF), RGB, CMYK and YCCK (Adobe).

/// How the components of a frame map to colours (T.872 / Adobe APP14 / JFIF rules, as libjpeg).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transform {
    Gray,
    YCbCr,
    Rgb,
    /// Adobe writes CMYK inverted (0 = full ink); `inverted` says which convention the file uses.
    Cmyk {
        inverted: bool,
    },
    /// Adobe's YCbCr-coded (inverted) CMY plus K.
    Ycck,
}

impl Transform {
    pub(super) fn pick(components: &[u8], adobe: Option<u8>, jfif: bool) -> Option<Transform> {
        Some(match components.len() {
            1 => Transform::Gray,
            3 => match adobe {
                Some(0) => Transform::Rgb,
                Some(_) => Transform::YCbCr,
                None if jfif => Transform::YCbCr,
                None if components == b"RGB" => Transform::Rgb,
                None => Transform::YCbCr,
            },
            4 => match adobe {
                Some(2) => Transform::Ycck,
                Some(_) => Transform::Cmyk { inverted: true },
                None => Transform::Cmyk { inverted: false },
            },
            _ => return None,
        })
    }

    pub(super) fn channels(self, raw_cmyk: bool) -> usize {
        match self {
            Transform::Gray => 1,
            Transform::Cmyk { .. } | Transform::Ycck if raw_cmyk => 4,
            _ => 3,
        }
    }
}

// JFIF YCbCr → RGB in 16.16 fixed point.
const CR_R: i32 = 91_881; // 1.402
const CB_G: i32 = 22_554; // 0.344136
const CR_G: i32 = 46_802; // 0.714136
const CB_B: i32 = 116_130; // 1.772
const HALF: i32 = 1 << 15;

#[inline(always)]
fn clamp(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

#[inline(always)]
fn ycc(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    let (y, cb, cr) = (i32::from(y), i32::from(cb) - 128, i32::from(cr) - 128);
    [clamp(y + ((CR_R * cr + HALF) >> 16)), clamp(y - ((CB_G * cb + CR_G * cr + HALF) >> 16)), clamp(y + ((CB_B * cb + HALF) >> 16))]
}

/// Ink (inverted convention: 255 = none) to light: `c · k / 255`, rounded.
#[inline(always)]
fn ink(c: u8, k: u8) -> u8 {
    let v = u32::from(c) * u32::from(k) + 128;
    ((v + (v >> 8)) >> 8) as u8
}

/// Converts one row. `rows` holds one upsampled row per component, each at least `out.len() /
/// channels` samples long. With `raw_cmyk`, CMYK and YCCK come out as 4-channel CMYK in the ICC
/// convention (0 = no ink), for a colour profile to convert.
pub(super) fn convert(transform: Transform, raw_cmyk: bool, rows: &[&[u8]], out: &mut [u8]) {
    match (transform, rows) {
        (Transform::Cmyk { inverted }, [c, m, y, k, ..]) if raw_cmyk => {
            let flip = if inverted { 255 } else { 0 };
            for ((((px, &c), &m), &y), &k) in out.chunks_exact_mut(4).zip(c.iter()).zip(m.iter()).zip(y.iter()).zip(k.iter()) {
                px.copy_from_slice(&[c ^ flip, m ^ flip, y ^ flip, k ^ flip]);
            }
        }
        (Transform::Ycck, [y, cb, cr, k, ..]) if raw_cmyk => {
            // The YCbCr-coded values are the inverted CMY: C = 255 - (255 - R) = R.
            for ((((px, &y), &cb), &cr), &k) in out.chunks_exact_mut(4).zip(y.iter()).zip(cb.iter()).zip(cr.iter()).zip(k.iter()) {
                let [r, g, b] = ycc(y, cb, cr);
                px.copy_from_slice(&[r, g, b, 255 - k]);
            }
        }
        (Transform::Gray, [g, ..]) => out.copy_from_slice(&g[..out.len()]),
        (Transform::YCbCr, [y, cb, cr, ..]) => {
            for (((px, &y), &cb), &cr) in out.chunks_exact_mut(3).zip(y.iter()).zip(cb.iter()).zip(cr.iter()) {
                px.copy_from_slice(&ycc(y, cb, cr));
            }
        }
        (Transform::Rgb, [r, g, b, ..]) => {
            for (((px, &r), &g), &b) in out.chunks_exact_mut(3).zip(r.iter()).zip(g.iter()).zip(b.iter()) {
                px.copy_from_slice(&[r, g, b]);
            }
        }
        (Transform::Cmyk { inverted }, [c, m, y, k, ..]) => {
            for ((((px, &c), &m), &y), &k) in out.chunks_exact_mut(3).zip(c.iter()).zip(m.iter()).zip(y.iter()).zip(k.iter()) {
                let [c, m, y, k] = if inverted { [c, m, y, k] } else { [255 - c, 255 - m, 255 - y, 255 - k] };
                px.copy_from_slice(&[ink(c, k), ink(m, k), ink(y, k)]);
            }
        }
        (Transform::Ycck, [y, cb, cr, k, ..]) => {
            for ((((px, &y), &cb), &cr), &k) in out.chunks_exact_mut(3).zip(y.iter()).zip(cb.iter()).zip(cr.iter()).zip(k.iter()) {
                let [r, g, b] = ycc(y, cb, cr);
                px.copy_from_slice(&[ink(255 - r, k), ink(255 - g, k), ink(255 - b, k)]);
            }
        }
        _ => out.fill(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_transforms_like_libjpeg() {
        assert_eq!(Transform::pick(b"\x01", None, false), Some(Transform::Gray));
        assert_eq!(Transform::pick(b"\x01\x02\x03", None, true), Some(Transform::YCbCr));
        assert_eq!(Transform::pick(b"RGB", None, false), Some(Transform::Rgb));
        assert_eq!(Transform::pick(b"RGB", Some(1), false), Some(Transform::YCbCr));
        assert_eq!(Transform::pick(b"\x01\x02\x03", Some(0), false), Some(Transform::Rgb));
        assert_eq!(Transform::pick(b"CMYK", Some(2), false), Some(Transform::Ycck));
        assert_eq!(Transform::pick(b"CMYK", Some(0), false), Some(Transform::Cmyk { inverted: true }));
        assert_eq!(Transform::pick(b"CMYK", None, false), Some(Transform::Cmyk { inverted: false }));
        assert_eq!(Transform::pick(b"\x01\x02", None, false), None);
    }

    #[test]
    fn converts_known_colours() {
        let mut out = [0u8; 6];
        // Pure red and mid grey in YCbCr.
        convert(Transform::YCbCr, false, &[&[76, 128], &[85, 128], &[255, 128]], &mut out);
        assert!(out[0] >= 253 && out[1] <= 2 && out[2] <= 2, "{out:?}");
        assert_eq!(&out[3..], &[128, 128, 128]);
        // Inverted CMYK: 255 everywhere is white paper; K = 0 is black.
        convert(Transform::Cmyk { inverted: true }, false, &[&[255, 255], &[255, 0], &[255, 255], &[255, 255]], &mut out);
        assert_eq!(out, [255, 255, 255, 255, 0, 255]);
        convert(Transform::Cmyk { inverted: false }, false, &[&[0], &[0], &[0], &[255]], &mut out[..3]);
        assert_eq!(&out[..3], &[0, 0, 0]);
        // YCCK white: Y = 0 (the inverted CMY are all 255 = no ink), K = 255.
        convert(Transform::Ycck, false, &[&[0], &[128], &[128], &[255]], &mut out[..3]);
        assert_eq!(&out[..3], &[255, 255, 255]);
        // Raw: ICC convention, 0 = no ink.
        let mut raw = [9u8; 4];
        convert(Transform::Ycck, true, &[&[0], &[128], &[128], &[255]], &mut raw);
        assert_eq!(raw, [0, 0, 0, 0]);
        convert(Transform::Cmyk { inverted: true }, true, &[&[255], &[0], &[255], &[200]], &mut raw);
        assert_eq!(raw, [0, 255, 0, 55]);
    }
}
