//! Embedded ICC profiles: RGB pixels described by a profile (Adobe RGB, Display P3 from phones,
//! …) are converted to sRGB, the space browsers assume for untagged images, since the output
//! carries no profile. Done on output-sized pixels, where it costs little.

use moxcms::{ColorProfile, DataColorSpace, Layout, TransformOptions};

/// Converts interleaved 8-bit RGB or RGBA `data` from `icc` to sRGB. `None` when the profile is
/// unreadable, not an RGB profile, or cannot be transformed: the pixels are then left as they
/// are (a broken profile must not fail the image).
pub(crate) fn to_srgb(data: &[u8], alpha: bool, icc: &[u8]) -> Option<Vec<u8>> {
    let source = ColorProfile::new_from_slice(icc).ok()?;
    if source.color_space != DataColorSpace::Rgb {
        return None;
    }
    let layout = if alpha { Layout::Rgba } else { Layout::Rgb };
    let transform = source.create_transform_8bit(layout, &ColorProfile::new_srgb(), layout, TransformOptions::default()).ok()?;
    let mut out = vec![0u8; data.len()];
    transform.transform(data, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_p3_becomes_more_saturated_srgb_and_garbage_is_ignored() {
        let p3 = ColorProfile::new_display_p3().encode().unwrap();
        // A P3 orange is outside sRGB's gamut towards red: in sRGB, red goes up and blue down.
        let out = to_srgb(&[200, 100, 50], false, &p3).unwrap();
        assert!(out[0] > 200 && out[2] < 50, "{out:?}");
        // Greys stay grey (same white point and transfer curve).
        let grey = to_srgb(&[128, 128, 128, 7], true, &p3).unwrap();
        assert!(grey[..3].iter().all(|&c| c.abs_diff(128) <= 1), "{grey:?}");
        assert_eq!(grey[3], 7, "alpha is untouched");
        let srgb = ColorProfile::new_srgb().encode().unwrap();
        let same = to_srgb(&[200, 100, 50], false, &srgb).unwrap();
        assert!(same.iter().zip([200u8, 100, 50]).all(|(a, b)| a.abs_diff(b) <= 1), "{same:?}");
        assert!(to_srgb(&[1, 2, 3], false, b"not a profile").is_none());
        let gray = ColorProfile::new_gray_with_gamma(2.2).encode().unwrap();
        assert!(to_srgb(&[1, 2, 3], false, &gray).is_none(), "not an RGB profile");
    }
}
