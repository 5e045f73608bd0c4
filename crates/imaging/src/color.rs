//! Embedded ICC profiles: RGB pixels described by a profile (Adobe RGB, Display P3 from phones,
//! …) are converted to sRGB, the space browsers assume for untagged images, since the output
//! carries no profile. Done on output-sized pixels, where it costs little.

use moxcms::{ColorProfile, DataColorSpace, Layout, RenderingIntent, TransformOptions};

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

/// Whether `icc` is a readable CMYK profile.
pub(crate) fn is_cmyk(icc: &[u8]) -> bool {
    ColorProfile::new_from_slice(icc).is_ok_and(|p| p.color_space == DataColorSpace::Cmyk)
}

/// Converts 8-bit CMYK (0 = no ink) described by the CMYK profile `icc` to sRGB, through the
/// profile's lookup tables (perceptual intent), as a print workflow would. Without a usable
/// profile, the plain ink formula `(255 - C)(255 - K) / 255`.
pub(crate) fn cmyk_to_srgb(data: &[u8], icc: Option<&[u8]>) -> Vec<u8> {
    let transform =
        icc.and_then(|icc| ColorProfile::new_from_slice(icc).ok()).filter(|p| p.color_space == DataColorSpace::Cmyk).and_then(|source| {
            let options = TransformOptions { rendering_intent: RenderingIntent::Perceptual, ..TransformOptions::default() };
            source.create_transform_8bit(Layout::Rgba, &ColorProfile::new_srgb(), Layout::Rgb, options).ok()
        });
    let mut out = vec![0u8; data.len() / 4 * 3];
    if let Some(t) = transform
        && t.transform(data, &mut out).is_ok()
    {
        return out;
    }
    for (px, cmyk) in out.chunks_exact_mut(3).zip(data.chunks_exact(4)) {
        let white = u32::from(255 - cmyk[3]);
        for (o, &ink) in px.iter_mut().zip(&cmyk[..3]) {
            *o = ((u32::from(255 - ink) * white + 127) / 255) as u8;
        }
    }
    out
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

    #[test]
    fn cmyk_without_a_profile_uses_the_ink_formula() {
        // Paper, full black, pure cyan, half-tone magenta.
        let out = cmyk_to_srgb(&[0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0, 0, 0, 128, 0, 0], None);
        assert_eq!(out, [255, 255, 255, 0, 0, 0, 0, 255, 255, 255, 127, 255]);
        assert!(!is_cmyk(b"garbage"));
        assert!(!is_cmyk(&ColorProfile::new_srgb().encode().unwrap()));
    }
}
