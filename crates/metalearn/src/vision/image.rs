//! Images to network inputs, as the pre-trained weights expect them: decoding (any colour
//! type to RGB), resizing the shorter side, centre crop and per-channel normalisation for
//! photos; bilinear enlargement of small grey images (Fashion-MNIST, Omniglot).

use std::path::Path;

use image::imageops::FilterType;
use image::RgbImage;

use crate::error::{Error, Result};
use crate::vision::backbone::Preprocess;

/// Decodes an image file (PNG, JPEG, WebP; grey, grey + alpha, RGBA and CMYK become RGB).
/// The error names the file.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let image = reader.decode().map_err(|e| {
        Error::Data(format!(
            "{}: not a readable image ({e}); pass --skip-bad-images to skip such files",
            path.display()
        ))
    })?;
    Ok(image.to_rgb8())
}

/// A photo as the network's input `[3, size, size]` (channel-major): the shorter side resized
/// to `preprocess.resize` with an antialiased bilinear filter (PIL's `BILINEAR`), the centre
/// `size` x `size` crop, each channel normalised.
pub fn photo_input(image: &RgbImage, preprocess: &Preprocess) -> Result<Vec<f32>> {
    let (w, h) = image.dimensions();
    let size = preprocess.size as u32;
    if w == 0 || h == 0 {
        return Err(Error::Data(
            "an empty image has no pixels to classify".into(),
        ));
    }
    // As torchvision's Resize(short) then CenterCrop(size): the shorter side becomes `short`,
    // the longer one `int(short * long / shorter)`, and the crop starts at
    // `round((side - size) / 2)` (Python's rounding, half to even).
    let short = preprocess.resize.max(preprocess.size) as u64;
    let (nw, nh) = if w <= h {
        (short as u32, (short * h as u64 / w as u64) as u32)
    } else {
        ((short * w as u64 / h as u64) as u32, short as u32)
    };
    let (nw, nh) = (nw.max(size), nh.max(size));
    let resized = if (nw, nh) == (w, h) {
        image.clone()
    } else {
        let filter = if preprocess.interpolation == "bicubic" {
            FilterType::CatmullRom
        } else {
            FilterType::Triangle
        };
        image::imageops::resize(image, nw, nh, filter)
    };
    let (left, top) = (centre_offset(nw - size), centre_offset(nh - size));
    let crop = image::imageops::crop_imm(&resized, left, top, size, size).to_image();
    Ok(rgb_input(&crop, preprocess))
}

/// `round(extra / 2)` with ties to the even integer, as Python's `round`.
fn centre_offset(extra: u32) -> u32 {
    let half = extra / 2;
    if extra % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// An RGB image already of the input size, normalised, channel-major.
pub fn rgb_input(image: &RgbImage, preprocess: &Preprocess) -> Vec<f32> {
    let (w, h) = image.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, pixel) in image.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = preprocess.normalise(pixel[c] as f32, c);
        }
    }
    out
}

/// A small grey image (`height` x `width` 8-bit values, row-major) as the network's input
/// `[3, size, size]`: enlarged with bilinear interpolation on pixel centres (PyTorch's
/// `interpolate(mode="bilinear", align_corners=False)`, no antialiasing), normalised, copied
/// to the three channels.
pub fn grey_input(pixels: &[u8], height: usize, width: usize, preprocess: &Preprocess) -> Vec<f32> {
    let plane = enlarge_plane(
        |y, x| pixels[y * width + x] as f32,
        height,
        width,
        preprocess.size,
    );
    let mut out = Vec::with_capacity(3 * plane.len());
    for c in 0..3 {
        out.extend(plane.iter().map(|&v| preprocess.normalise(v, c)));
    }
    out
}

/// A small RGB image enlarged to the input size as [`grey_input`] enlarges a grey one, each
/// channel on its own.
pub fn enlarged_input(image: &RgbImage, preprocess: &Preprocess) -> Vec<f32> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let raw = image.as_raw();
    let mut out = Vec::with_capacity(3 * preprocess.size * preprocess.size);
    for c in 0..3 {
        let plane = enlarge_plane(
            |y, x| raw[(y * w + x) * 3 + c] as f32,
            h,
            w,
            preprocess.size,
        );
        out.extend(plane.into_iter().map(|v| preprocess.normalise(v, c)));
    }
    out
}

/// One `height` x `width` plane (`value(y, x)`) enlarged to `size` x `size` by bilinear
/// interpolation on pixel centres, clamped at the border.
fn enlarge_plane(
    value: impl Fn(usize, usize) -> f32,
    height: usize,
    width: usize,
    size: usize,
) -> Vec<f32> {
    let source = |side: usize, i: usize| {
        // Centre of output pixel i in input coordinates, clamped at the border.
        let x = ((i as f64 + 0.5) * side as f64 / size as f64 - 0.5).max(0.0);
        let lo = (x.floor() as usize).min(side - 1);
        let hi = (lo + 1).min(side - 1);
        (lo, hi, (x - lo as f64) as f32)
    };
    let cols: Vec<_> = (0..size).map(|i| source(width, i)).collect();
    let mut out = Vec::with_capacity(size * size);
    for oy in 0..size {
        let (y0, y1, fy) = source(height, oy);
        for &(x0, x1, fx) in &cols {
            let top = value(y0, x0) * (1.0 - fx) + value(y0, x1) * fx;
            let bottom = value(y1, x0) * (1.0 - fx) + value(y1, x1) * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_enlargement_matches_pixel_centre_interpolation() {
        // 2x2 to 4x4: output centres at input 0.25 steps from -0.25 (clamped to 0) to 1.25
        // (clamped to 1).
        let p = Preprocess {
            size: 4,
            resize: 4,
            mean: [0.0; 3],
            std: [1.0 / 255.0; 3],
            interpolation: "bilinear".into(),
        };
        let out = grey_input(&[0, 100, 200, 40], 2, 2, &p);
        for (got, want) in out[..4].iter().zip([0.0, 25.0, 75.0, 100.0]) {
            assert!((got - want).abs() < 1e-4, "{:?}", &out[..4]);
        }
        // Row 1 lies a quarter of the way from row 0 to row 1 of the input.
        let want = 0.75 * 25.0 + 0.25 * (200.0 * 0.75 + 40.0 * 0.25);
        assert!((out[5] - want).abs() < 1e-4, "{} vs {want}", out[5]);
        // The three channels are equal.
        assert_eq!(out[..16], out[16..32]);
    }

    #[test]
    fn photo_is_resized_on_its_shorter_side_and_centre_cropped() {
        let mut image = RgbImage::new(40, 20);
        for (x, _, px) in image.enumerate_pixels_mut() {
            *px = image::Rgb([x as u8 * 6, 0, 255]);
        }
        let p = Preprocess {
            size: 8,
            resize: 10,
            mean: [0.0; 3],
            std: [1.0; 3],
            interpolation: "bilinear".into(),
        };
        let input = photo_input(&image, &p).expect("resizes");
        assert_eq!(input.len(), 3 * 64);
        // Resized to 20x10, the crop keeps columns 6..14: the red ramp is centred.
        let red_row: Vec<f32> = input[..8].to_vec();
        assert!(red_row.windows(2).all(|w| w[1] > w[0]), "{red_row:?}");
        let middle = (red_row[3] + red_row[4]) / 2.0;
        assert!((middle - 0.47).abs() < 0.03, "{middle}");
        assert!(input[128..].iter().all(|&b| (b - 1.0).abs() < 1e-6));
    }
}
