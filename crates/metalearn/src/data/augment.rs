//! Random image augmentation for meta-training episodes: small affine jitter (shift, rotation,
//! scale, shear), smooth elastic distortion and stroke-thickness changes, drawn afresh for every
//! image.
//!
//! Images are `[channels, height, width]` with ink high and background 0 (as the Omniglot loader
//! produces), so pixels that come from outside the frame are background. Augmentation applies to
//! meta-training episodes only; validation and test episodes always see the images as loaded.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A copy of an image turned clockwise by `quarter_turns` x 90 degrees, after a left-right
/// mirroring when `mirrored`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    /// Mirror left-right first.
    pub mirrored: bool,
    /// Then turn clockwise this many times by 90 degrees.
    pub quarter_turns: u8,
}

impl Variant {
    /// The image itself.
    pub const IDENTITY: Variant = Variant {
        mirrored: false,
        quarter_turns: 0,
    };

    /// Applies the variant to a row-major `height x width` image. Callers check that turned
    /// images are square (the loader and `Supersampled::new` do), so this stays crate-internal.
    pub(crate) fn apply(self, mut image: Vec<f32>, height: usize, width: usize) -> Vec<f32> {
        if self.mirrored {
            image.chunks_exact_mut(width).for_each(<[f32]>::reverse);
        }
        if self.quarter_turns.is_multiple_of(4) {
            image
        } else {
            rotate_square(&image, height, self.quarter_turns)
        }
    }
}

/// Rotates a square row-major image clockwise by `quarter_turns` x 90 degrees.
pub(crate) fn rotate_square(src: &[f32], side: usize, quarter_turns: u8) -> Vec<f32> {
    let mut out = vec![0f32; side * side];
    for y in 0..side {
        for x in 0..side {
            let (sy, sx) = match quarter_turns % 4 {
                0 => (y, x),
                1 => (side - 1 - x, y),
                2 => (side - 1 - y, side - 1 - x),
                _ => (x, side - 1 - y),
            };
            out[y * side + x] = src[sy * side + sx];
        }
    }
    out
}

/// How strongly to perturb each training image. Every field is the half-width of a uniform
/// range around "unchanged"; 0 turns that perturbation off.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Largest translation, in pixels, along each axis.
    #[serde(default)]
    pub shift: f64,
    /// Largest rotation, in degrees, either way.
    #[serde(default)]
    pub rotation: f64,
    /// Largest relative change of size: 0.1 scales by a factor in [0.9, 1.1].
    #[serde(default)]
    pub scale: f64,
    /// Largest horizontal shear (tangent of the shear angle).
    #[serde(default)]
    pub shear: f64,
    /// Largest change of stroke thickness, in [0, 1]: a positive draw blends the image towards
    /// its dilation (thicker strokes), a negative one towards its erosion (thinner strokes).
    #[serde(default)]
    pub stroke: f64,
    /// Largest displacement, in pixels, of a smooth random distortion: each point of a 4x4 grid
    /// over the image moves by up to this much along each axis, and pixels between grid points
    /// move by the bilinear blend of their neighbours' moves, so strokes bend as a different
    /// hand would draw them.
    #[serde(default)]
    pub elastic: f64,
}

impl Augment {
    /// Checks that every range is finite and within what keeps a character recognisable; the
    /// error names the field (as `task.augment.<field>`) and the allowed range.
    pub fn validate(&self) -> Result<()> {
        match self.problem() {
            Some((_, message)) => Err(Error::Config(message)),
            None => Ok(()),
        }
    }

    /// The first out-of-range field, as its config key and a message naming the allowed range.
    pub fn problem(&self) -> Option<(String, String)> {
        let fields = [
            ("shift", self.shift, 8.0, "pixels"),
            ("rotation", self.rotation, 45.0, "degrees"),
            ("scale", self.scale, 0.5, "relative change of size"),
            ("shear", self.shear, 0.5, "tangent of the shear angle"),
            ("elastic", self.elastic, 4.0, "pixels"),
            (
                "stroke",
                self.stroke,
                1.0,
                "blend towards dilation or erosion",
            ),
        ];
        for (name, value, max, unit) in fields {
            if !value.is_finite() || !(0.0..=max).contains(&value) {
                let key = format!("task.augment.{name}");
                let message = format!(
                    "`{key}` = {value} is out of range: use a value in [0, {max}] \
                     ({unit}; 0 turns it off)"
                );
                return Some((key, message));
            }
        }
        None
    }

    /// Whether any perturbation is switched on.
    pub fn is_active(&self) -> bool {
        self.has_geometry() || self.stroke > 0.0
    }

    fn has_geometry(&self) -> bool {
        self.shift > 0.0
            || self.rotation > 0.0
            || self.scale > 0.0
            || self.shear > 0.0
            || self.elastic > 0.0
    }

    /// Perturbs every image of `images` (`count` images of `[channels, height, width]`, laid out
    /// contiguously) in place, each with its own random draw.
    pub fn apply(
        &self,
        images: &mut [f32],
        [channels, height, width]: [usize; 3],
        rng: &mut ChaCha8Rng,
    ) {
        let image_len = channels * height * width;
        if image_len == 0 || !self.is_active() {
            return;
        }
        let mut scratch = vec![0f32; height * width];
        for image in images.chunks_exact_mut(image_len) {
            if self.has_geometry() {
                let warp = self.draw_warp(rng);
                for plane in image.chunks_exact_mut(height * width) {
                    warp.resample(plane, &mut scratch, height, width);
                    plane.copy_from_slice(&scratch);
                }
            }
            if self.stroke > 0.0 {
                let amount = rng.gen_range(-self.stroke..=self.stroke) as f32;
                for plane in image.chunks_exact_mut(height * width) {
                    change_stroke(plane, &mut scratch, height, width, amount);
                    plane.copy_from_slice(&scratch);
                }
            }
        }
    }

    fn draw_warp(&self, rng: &mut ChaCha8Rng) -> Warp {
        let mut symmetric = |half: f64| {
            if half > 0.0 {
                rng.gen_range(-half..=half)
            } else {
                0.0
            }
        };
        let angle = symmetric(self.rotation).to_radians();
        let scale = 1.0 + symmetric(self.scale);
        let shear = symmetric(self.shear);
        let shift = [symmetric(self.shift), symmetric(self.shift)];
        // Forward map (about the centre): p' = R · S_hear · s·p + t. Resampling needs the inverse.
        let (sin, cos) = angle.sin_cos();
        let forward = [
            [scale * cos, scale * (cos * shear - sin)],
            [scale * sin, scale * (sin * shear + cos)],
        ];
        let det = forward[0][0] * forward[1][1] - forward[0][1] * forward[1][0];
        let inverse = [
            [forward[1][1] / det, -forward[0][1] / det],
            [-forward[1][0] / det, forward[0][0] / det],
        ];
        let displacement = (self.elastic > 0.0).then(|| {
            let mut draw = || symmetric(self.elastic);
            let mut grid = [[0.0; 2]; ELASTIC_GRID * ELASTIC_GRID];
            for point in &mut grid {
                *point = [draw(), draw()];
            }
            grid
        });
        Warp {
            inverse,
            shift,
            displacement,
        }
    }
}

/// Training images kept at an integer multiple (`factor`) of the model's resolution, so that
/// augmentation warps the fine drawing and then shrinks it with a box filter, as the loader
/// shrinks unaugmented images. Warping at the model's resolution instead would blur every
/// augmented image, which unaugmented validation and test images are not.
#[derive(Clone, Debug)]
pub struct Supersampled {
    factor: usize,
    height: usize,
    width: usize,
    /// Ink levels (0 = background, 255 = ink) of the distinct drawings, each
    /// `[height · factor, width · factor]`.
    pixels: Vec<u8>,
    /// For each example of the pool: its drawing, and how it is mirrored and turned.
    examples: Vec<(u32, Variant)>,
}

impl Supersampled {
    /// `pixels` holds `drawings` images of `[height · factor, width · factor]`; `examples` maps
    /// each pool example to a drawing and how to mirror and turn it (square images only when
    /// turning).
    pub fn new(
        factor: usize,
        [height, width]: [usize; 2],
        pixels: Vec<u8>,
        examples: Vec<(u32, Variant)>,
    ) -> Result<Self> {
        let plane = height * factor * width * factor;
        if factor == 0 || plane == 0 || !pixels.len().is_multiple_of(plane) {
            return Err(Error::Data(format!(
                "supersampled images: {} pixels do not make whole {height}x{width} images at \
                 factor {factor}",
                pixels.len()
            )));
        }
        let drawings = pixels.len() / plane;
        if let Some((i, _)) = examples.iter().enumerate().find(|(_, (d, variant))| {
            *d as usize >= drawings || (!variant.quarter_turns.is_multiple_of(4) && height != width)
        }) {
            return Err(Error::Data(format!(
                "supersampled images: example {i} refers to a missing drawing or turns a \
                 non-square image"
            )));
        }
        Ok(Self {
            factor,
            height,
            width,
            pixels,
            examples,
        })
    }

    /// Number of pool examples covered.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether no examples are covered.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The model's image size `[height, width]`.
    pub fn image_size(&self) -> [usize; 2] {
        [self.height, self.width]
    }

    /// Example `index` at the fine resolution, mirrored and turned, as f32 ink levels in
    /// `[0, 1]`.
    fn fine_image(&self, index: u32) -> Vec<f32> {
        let (drawing, variant) = self.examples[index as usize];
        let (h, w) = (self.height * self.factor, self.width * self.factor);
        let start = drawing as usize * h * w;
        let image = &self.pixels[start..start + h * w];
        let ink: Vec<f32> = image.iter().map(|&v| f32::from(v) / 255.0).collect();
        // Turned images are square (checked in `new`).
        variant.apply(ink, h, w)
    }
}

impl Augment {
    /// Augmented copies of pool examples `indices` (`[indices.len(), 1, height, width]`, laid
    /// out contiguously): each is warped at the fine resolution, shrunk by box filtering, then
    /// given its stroke change.
    pub fn apply_supersampled(
        &self,
        fine: &Supersampled,
        indices: &[u32],
        rng: &mut ChaCha8Rng,
    ) -> Vec<f32> {
        let (h, w, f) = (fine.height, fine.width, fine.factor);
        let mut out = vec![0f32; indices.len() * h * w];
        let mut warped = vec![0f32; h * f * w * f];
        let mut scratch = vec![0f32; h * w];
        for (&index, plane) in indices.iter().zip(out.chunks_exact_mut(h * w)) {
            let image = fine.fine_image(index);
            let source = if self.has_geometry() {
                let mut warp = self.draw_warp(rng);
                // Shifts and displacements are drawn in model pixels.
                warp.scale_distances(f as f64);
                warp.resample(&image, &mut warped, h * f, w * f);
                &warped
            } else {
                &image
            };
            box_shrink(source, f, h, w, plane);
            if self.stroke > 0.0 {
                let amount = rng.gen_range(-self.stroke..=self.stroke) as f32;
                change_stroke(plane, &mut scratch, h, w, amount);
                plane.copy_from_slice(&scratch);
            }
        }
        out
    }
}

/// Averages `factor x factor` blocks of the fine `source` into the `height x width` `out`.
fn box_shrink(source: &[f32], factor: usize, height: usize, width: usize, out: &mut [f32]) {
    let fine_width = width * factor;
    let scale = 1.0 / (factor * factor) as f32;
    for y in 0..height {
        for x in 0..width {
            let mut sum = 0.0;
            for dy in 0..factor {
                let row = (y * factor + dy) * fine_width + x * factor;
                sum += source[row..row + factor].iter().sum::<f32>();
            }
            out[y * width + x] = sum * scale;
        }
    }
}

/// Control points per axis of the elastic displacement grid.
const ELASTIC_GRID: usize = 4;

/// An affine map about the image centre, kept as its inverse for resampling, then an optional
/// smooth displacement of where each output pixel samples the source.
struct Warp {
    /// Inverse of the linear part, in (x, y) order.
    inverse: [[f64; 2]; 2],
    /// Translation (x, y) in pixels.
    shift: [f64; 2],
    /// Displacement (x, y) in pixels of each point of an `ELASTIC_GRID x ELASTIC_GRID` grid
    /// spanning the image, row by row.
    displacement: Option<[[f64; 2]; ELASTIC_GRID * ELASTIC_GRID]>,
}

impl Warp {
    /// Multiplies every distance (shift and displacements) by `factor`, for an image `factor`
    /// times finer than the one they were drawn for.
    fn scale_distances(&mut self, factor: f64) {
        self.shift = self.shift.map(|v| v * factor);
        if let Some(grid) = &mut self.displacement {
            for point in grid.iter_mut() {
                *point = point.map(|v| v * factor);
            }
        }
    }

    /// The displacement at `(u, v)`, the pixel's position as a fraction of the image's width
    /// and height, blended bilinearly from the grid.
    fn displacement_at(&self, u: f64, v: f64) -> [f64; 2] {
        let Some(grid) = &self.displacement else {
            return [0.0, 0.0];
        };
        let last = (ELASTIC_GRID - 1) as f64;
        let (gx, gy) = (u.clamp(0.0, 1.0) * last, v.clamp(0.0, 1.0) * last);
        let (x0, y0) = (
            (gx.floor() as usize).min(ELASTIC_GRID - 2),
            (gy.floor() as usize).min(ELASTIC_GRID - 2),
        );
        let (fx, fy) = (gx - x0 as f64, gy - y0 as f64);
        let at = |x: usize, y: usize| grid[y * ELASTIC_GRID + x];
        let mut out = [0.0; 2];
        for (axis, value) in out.iter_mut().enumerate() {
            let top = at(x0, y0)[axis] * (1.0 - fx) + at(x0 + 1, y0)[axis] * fx;
            let bottom = at(x0, y0 + 1)[axis] * (1.0 - fx) + at(x0 + 1, y0 + 1)[axis] * fx;
            *value = top * (1.0 - fy) + bottom * fy;
        }
        out
    }

    /// Writes the warped `source` plane into `out` with bilinear interpolation; pixels mapped
    /// from outside the frame are background (0).
    fn resample(&self, source: &[f32], out: &mut [f32], height: usize, width: usize) {
        let centre = [(width as f64 - 1.0) / 2.0, (height as f64 - 1.0) / 2.0];
        let at = |x: isize, y: isize| -> f32 {
            if x < 0 || y < 0 || x >= width as isize || y >= height as isize {
                0.0
            } else {
                source[y as usize * width + x as usize]
            }
        };
        let span = [
            (width as f64 - 1.0).max(1.0),
            (height as f64 - 1.0).max(1.0),
        ];
        for y in 0..height {
            for x in 0..width {
                let dx = x as f64 - centre[0] - self.shift[0];
                let dy = y as f64 - centre[1] - self.shift[1];
                let bend = self.displacement_at(x as f64 / span[0], y as f64 / span[1]);
                let sx = self.inverse[0][0] * dx + self.inverse[0][1] * dy + centre[0] + bend[0];
                let sy = self.inverse[1][0] * dx + self.inverse[1][1] * dy + centre[1] + bend[1];
                let (x0, y0) = (sx.floor(), sy.floor());
                let (fx, fy) = ((sx - x0) as f32, (sy - y0) as f32);
                let (x0, y0) = (x0 as isize, y0 as isize);
                let top = at(x0, y0) * (1.0 - fx) + at(x0 + 1, y0) * fx;
                let bottom = at(x0, y0 + 1) * (1.0 - fx) + at(x0 + 1, y0 + 1) * fx;
                out[y * width + x] = top * (1.0 - fy) + bottom * fy;
            }
        }
    }
}

/// Blends `plane` towards its 3x3-cross dilation (`amount` > 0) or erosion (`amount` < 0) by
/// `|amount|`, writing the result to `out`.
fn change_stroke(plane: &[f32], out: &mut [f32], height: usize, width: usize, amount: f32) {
    let thicker = amount > 0.0;
    let weight = amount.abs();
    for y in 0..height {
        for x in 0..width {
            let centre = plane[y * width + x];
            let mut extreme = centre;
            let neighbours = [
                (x.wrapping_sub(1), y),
                (x + 1, y),
                (x, y.wrapping_sub(1)),
                (x, y + 1),
            ];
            for (nx, ny) in neighbours {
                // Outside the frame is background, which erosion takes and dilation ignores.
                let value = if nx < width && ny < height {
                    plane[ny * width + nx]
                } else {
                    0.0
                };
                extreme = if thicker {
                    extreme.max(value)
                } else {
                    extreme.min(value)
                };
            }
            out[y * width + x] = centre + weight * (extreme - centre);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn rotations_compose_to_identity_and_turn_clockwise() {
        let src: Vec<f32> = (0..9).map(|i| i as f32).collect();
        // 0 1 2 / 3 4 5 / 6 7 8 turned clockwise: 6 3 0 / 7 4 1 / 8 5 2.
        assert_eq!(
            rotate_square(&src, 3, 1),
            vec![6., 3., 0., 7., 4., 1., 8., 5., 2.]
        );
        let twice = rotate_square(&rotate_square(&src, 3, 1), 3, 1);
        assert_eq!(twice, rotate_square(&src, 3, 2));
        let four = rotate_square(&rotate_square(&twice, 3, 1), 3, 1);
        assert_eq!(four, src);
    }

    fn ink_sum(plane: &[f32]) -> f32 {
        plane.iter().sum()
    }

    fn dot_image() -> Vec<f32> {
        let mut plane = vec![0f32; 9 * 9];
        for y in 3..6 {
            for x in 3..6 {
                plane[y * 9 + x] = 1.0;
            }
        }
        plane
    }

    #[test]
    fn supersampled_images_shrink_and_turn_like_the_loader() {
        // One 2x2 drawing at factor 2 (a 4x4 fine image): ink in the fine top-left block only.
        let mut pixels = vec![0u8; 16];
        for (y, x) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            pixels[y * 4 + x] = 255;
        }
        let turned = Variant {
            mirrored: false,
            quarter_turns: 1,
        };
        let fine = Supersampled::new(2, [2, 2], pixels, vec![(0, Variant::IDENTITY), (0, turned)])
            .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let out = Augment::default().apply_supersampled(&fine, &[0, 1], &mut rng);
        // Unturned: ink top-left; one clockwise quarter turn: ink top-right.
        assert_eq!(out, vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        assert!(Supersampled::new(2, [2, 2], vec![0; 15], vec![]).is_err());
        assert!(Supersampled::new(2, [2, 2], vec![0; 16], vec![(1, Variant::IDENTITY)]).is_err());
    }

    #[test]
    fn zero_ranges_leave_images_unchanged() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut image = dot_image();
        Augment::default().apply(&mut image, [1, 9, 9], &mut rng);
        assert_eq!(image, dot_image());
    }

    #[test]
    fn whole_pixel_shift_moves_the_ink() {
        let warp = Warp {
            inverse: [[1.0, 0.0], [0.0, 1.0]],
            shift: [2.0, -1.0],
            displacement: None,
        };
        let source = dot_image();
        let mut out = vec![0f32; 81];
        warp.resample(&source, &mut out, 9, 9);
        for y in 0..9 {
            for x in 0..9 {
                let expected = if (5..8).contains(&x) && (2..5).contains(&y) {
                    1.0
                } else {
                    0.0
                };
                assert!((out[y * 9 + x] - expected).abs() < 1e-6, "pixel ({x}, {y})");
            }
        }
    }

    #[test]
    fn elastic_displacement_blends_the_grid_and_moves_the_ink() {
        // The same displacement everywhere samples one pixel to the right: ink moves left.
        let warp = Warp {
            inverse: [[1.0, 0.0], [0.0, 1.0]],
            shift: [0.0, 0.0],
            displacement: Some([[1.0, 0.0]; ELASTIC_GRID * ELASTIC_GRID]),
        };
        let mut out = vec![0f32; 81];
        warp.resample(&dot_image(), &mut out, 9, 9);
        for y in 0..9 {
            for x in 0..9 {
                let expected = f32::from((2..5).contains(&x) && (3..6).contains(&y));
                assert!((out[y * 9 + x] - expected).abs() < 1e-6, "pixel ({x}, {y})");
            }
        }
        // Grid points keep their own displacement; between them it is the bilinear blend.
        let mut grid = [[0.0; 2]; ELASTIC_GRID * ELASTIC_GRID];
        grid[0] = [3.0, -2.0];
        grid[1] = [1.0, 0.0];
        let mut warp = Warp {
            displacement: Some(grid),
            ..warp
        };
        assert_eq!(warp.displacement_at(0.0, 0.0), [3.0, -2.0]);
        assert_eq!(warp.displacement_at(1.0 / 3.0, 0.0), [1.0, 0.0]);
        assert_eq!(warp.displacement_at(1.0 / 6.0, 0.0), [2.0, -1.0]);
        assert_eq!(warp.displacement_at(1.0, 1.0), [0.0, 0.0]);
        warp.scale_distances(3.0);
        assert_eq!(warp.displacement_at(0.0, 0.0), [9.0, -6.0]);
    }

    #[test]
    fn stroke_changes_thicken_and_thin() {
        let source = dot_image();
        let mut out = vec![0f32; 81];
        change_stroke(&source, &mut out, 9, 9, 1.0);
        // A 3x3 block dilated by a cross gains 4 edges of 3 pixels.
        assert_eq!(ink_sum(&out), 9.0 + 12.0);
        change_stroke(&source, &mut out, 9, 9, -1.0);
        assert_eq!(ink_sum(&out), 1.0);
        change_stroke(&source, &mut out, 9, 9, 0.5);
        assert_eq!(ink_sum(&out), 9.0 + 6.0);
    }

    #[test]
    fn draws_differ_per_image_and_stay_in_range() {
        let augment = Augment {
            shift: 1.5,
            rotation: 10.0,
            scale: 0.1,
            shear: 0.1,
            stroke: 0.5,
            elastic: 1.0,
        };
        augment.validate().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut images: Vec<f32> = dot_image().repeat(2);
        augment.apply(&mut images, [1, 9, 9], &mut rng);
        assert_ne!(images[..81], images[81..]);
        assert!(images.iter().all(|v| (0.0..=1.0 + 1e-6).contains(v)));
        assert!(ink_sum(&images[..81]) > 3.0);
    }

    #[test]
    fn out_of_range_fields_are_named() {
        let augment = Augment {
            rotation: 90.0,
            ..Augment::default()
        };
        let message = augment.validate().unwrap_err().to_string();
        assert!(message.contains("task.augment.rotation"), "{message}");
        let augment = Augment {
            shift: f64::NAN,
            ..Augment::default()
        };
        assert!(augment.validate().is_err());
        let augment = Augment {
            elastic: 5.0,
            ..Augment::default()
        };
        let message = augment.validate().unwrap_err().to_string();
        assert!(message.contains("task.augment.elastic"), "{message}");
    }
}
