//! Winograd's minimal filtering F(2×2, 3×3) for 3×3 stride-1 convolutions on channels-last
//! image rows: 16 multiplications per 2×2 output tile and channel pair instead of 36.
//!
//! The weight `g` of each (channel, filter) pair becomes `U = G g Gᵀ` (4×4), each 4×4 input
//! tile `d` of each channel becomes `V = Bᵀ d B`, the 16 positions `(i, j)` of the tiles are 16
//! independent matrix products `M_ij = V_ij · U_ij` over channels, and `Aᵀ M A` turns each 4×4
//! product tile back into a 2×2 output tile. The transforms hold only
//! 0, ±1 and ½, so in f64 the result equals direct convolution to rounding; in f32 it differs
//! by a few units in the last place of the largest products.
//!
//! Used by the fused first-order convolution ([`crate::kernels::fused::ConvRows`]) for its
//! forward pass and for the input gradient (a 3×3 convolution of the output gradient with the
//! flipped, transposed weight). The weight gradient stays an im2col product.

use candle_core::WithDType;

use crate::kernels::conv::ConvGeometry;
use crate::kernels::fused::gemm_into;
use crate::kernels::{vectorized, with_scratch};

/// Fewer input channels than this leave the products too thin to pay for the transforms
/// (a first layer on grey images has one).
const MIN_CHANNELS: usize = 4;

/// Whether a convolution of this shape is one Winograd's F(2×2, 3×3) computes.
fn fits(g: &ConvGeometry) -> bool {
    g.kernel == 3
        && g.stride == 1
        && g.padding <= 2
        && g.height + 2 * g.padding >= 3
        && g.width + 2 * g.padding >= 3
}

/// Whether a convolution of this shape takes the Winograd path.
pub(crate) fn applies(g: &ConvGeometry) -> bool {
    fits(g) && g.channels >= MIN_CHANNELS
}

/// Output tiles per image (2×2 each; a last odd row or column fills half a tile).
pub(crate) fn tiles_per_image(g: &ConvGeometry) -> usize {
    g.out_height().div_ceil(2) * g.out_width().div_ceil(2)
}

/// Tile `tile` counted from image `first`: its image and its tile row and column.
#[inline(always)]
fn tile_position(g: &ConvGeometry, first: usize, tile: usize) -> (usize, usize, usize) {
    let tiles_across = g.out_width().div_ceil(2);
    let per_image = tiles_per_image(g);
    let within = tile % per_image;
    (
        first + tile / per_image,
        within / tiles_across,
        within % tiles_across,
    )
}

/// The geometry of the input gradient of convolution `g` as a Winograd convolution, if it is
/// one (see [`ConvGeometry::input_gradient`]).
pub(crate) fn input_gradient_geometry(g: &ConvGeometry, filters: usize) -> Option<ConvGeometry> {
    g.input_gradient(filters)
        .filter(|geometry| fits(g) && applies(geometry))
}

/// The weight `[tasks][3·3·c][f]` (rows in patch order: kernel row, kernel column, channel)
/// flipped in both kernel directions with channels and filters swapped: `[tasks][3·3·f][c]`,
/// the weight of the input-gradient convolution.
pub(crate) fn flipped_weights<T: WithDType>(w: &[T], tasks: usize, c: usize, f: usize) -> Vec<T> {
    let mut out = vec![T::zero(); tasks * 9 * c * f];
    for t in 0..tasks {
        let (src, dst) = (&w[t * 9 * c * f..], &mut out[t * 9 * c * f..]);
        for ky in 0..3 {
            for kx in 0..3 {
                let (from, to) = ((ky * 3 + kx) * c, ((2 - ky) * 3 + 2 - kx) * f);
                for ch in 0..c {
                    for fo in 0..f {
                        dst[(to + fo) * c + ch] = src[(from + ch) * f + fo];
                    }
                }
            }
        }
    }
    out
}

/// `Uₜ = G g Gᵀ` for every task, channel and filter: `[tasks][3·3·c][f]` → `[tasks][16][c][f]`.
pub(crate) fn transform_weights<T: WithDType>(w: &[T], tasks: usize, c: usize, f: usize) -> Vec<T> {
    let half = T::from_f64(0.5);
    // G applied to the three values (a, b, c) of one kernel column or row.
    let g_times = |[a, b, c]: [T; 3]| [a, (a + b + c) * half, (a - b + c) * half, c];
    separable_transform(w, tasks, c, f, g_times)
}

/// `M X Mᵀ` for every task, channel and filter of `src` (`[tasks][N·N][c][f]`) into
/// `[tasks][K·K][c][f]`, where `m` applies M to one column of N values. M goes along the
/// first index for each column, then along the second for each resulting row.
fn separable_transform<T: WithDType, const N: usize, const K: usize>(
    src: &[T],
    tasks: usize,
    c: usize,
    f: usize,
    m: impl Fn([T; N]) -> [T; K],
) -> Vec<T> {
    let mut out = vec![T::zero(); tasks * K * K * c * f];
    for t in 0..tasks {
        let (src, dst) = (&src[t * N * N * c * f..], &mut out[t * K * K * c * f..]);
        for ch in 0..c {
            for fo in 0..f {
                let at = |i: usize, j: usize| src[((i * N + j) * c + ch) * f + fo];
                let columns: [[T; K]; N] =
                    std::array::from_fn(|j| m(std::array::from_fn(|i| at(i, j))));
                for i in 0..K {
                    let row = m(std::array::from_fn(|j| columns[j][i]));
                    for (j, value) in row.into_iter().enumerate() {
                        dst[((i * K + j) * c + ch) * f + fo] = value;
                    }
                }
            }
        }
    }
    out
}

/// Convolves images `first..first + count` of `x` (`[images·h·w·c]`, channels last) with one
/// task's transformed weight `u` (`[16][c][f]`, from [`transform_weights`]) into `out`
/// (`[count·oh·ow·f]`).
pub(crate) fn convolve_images<T: WithDType>(
    g: &ConvGeometry,
    x: &[T],
    u: &[T],
    filters: usize,
    (first, count): (usize, usize),
    out: &mut [T],
) {
    let (c, f) = (g.channels, filters);
    let tiles = count * tiles_per_image(g);
    // Per tile: its 16 transformed positions of c channels, then their 16 products of f filters.
    with_scratch::<T, _>(tiles * 16 * c, tiles * 16 * f, |v, m| {
        vectorized!(convolve_tiles(g, x, u, f, first, v, m, out))
    })
}

/// [`convolve_images`] with scratch space for the transformed inputs `v` and the products `m`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn convolve_tiles<T: WithDType>(
    g: &ConvGeometry,
    x: &[T],
    u: &[T],
    f: usize,
    first: usize,
    v: &mut [T],
    m: &mut [T],
    out: &mut [T],
) {
    let c = g.channels;
    let tiles = v.len() / (16 * c);
    let mut patch = vec![T::zero(); 16 * c];
    for (tile, v_tile) in v.chunks_exact_mut(16 * c).enumerate() {
        gather_patch(g, x, first, tile, &mut patch);
        transform_input(&patch, v_tile, c);
    }
    for (k, u_k) in u.chunks_exact(c * f).take(16).enumerate() {
        // Safety: row `tile` of product k is m[tile·16f + k·f ..][..f], of input k
        // v[tile·16c + k·c ..][..c]; all lie inside the buffers.
        unsafe {
            gemm_into(
                (tiles, f, c),
                m.as_mut_ptr().add(k * f),
                16 * f,
                false,
                (v.as_ptr().add(k * c), 16 * c, 1),
                (u_k.as_ptr(), f, 1),
            )
        }
    }
    let mut y = vec![T::zero(); 4 * f];
    for (tile, m_tile) in m.chunks_exact(16 * f).enumerate() {
        transform_output(m_tile, &mut y, f);
        scatter_tile(g, f, tile, &y, out);
    }
}

/// Adds to `du` (`[16][c][f]`) the gradient of the transformed weight `U` for images
/// `first..first + count` of `x` and their output gradient `grad` (`[images·oh·ow·f]`):
/// Σ over tiles of `V_ij[tile]ᵀ · (A dY Aᵀ)_ij[tile]` for each of the 16 positions `(i, j)`.
pub(crate) fn accumulate_transformed_weight_gradient<T: WithDType>(
    g: &ConvGeometry,
    x: &[T],
    grad: &[T],
    f: usize,
    (first, count): (usize, usize),
    du: &mut [T],
) {
    let c = g.channels;
    let tiles = count * tiles_per_image(g);
    with_scratch::<T, _>(tiles * 16 * c, tiles * 16 * f, |v, dm| {
        vectorized!({
            let mut patch = vec![T::zero(); 16 * c];
            for (tile, v_tile) in v.chunks_exact_mut(16 * c).enumerate() {
                gather_patch(g, x, first, tile, &mut patch);
                transform_input(&patch, v_tile, c);
            }
            let mut dy = vec![T::zero(); 4 * f];
            for (tile, dm_tile) in dm.chunks_exact_mut(16 * f).enumerate() {
                gather_output_gradient(g, f, first, tile, grad, &mut dy);
                transform_output_gradient(&dy, dm_tile, f);
            }
            for k in 0..16 {
                // Safety: column `tile` of input k is v[tile·16c + k·c ..][..c], row `tile` of
                // gradient k dm[tile·16f + k·f ..][..f]; du holds 16 blocks of c×f.
                unsafe {
                    gemm_into(
                        (c, f, tiles),
                        du.as_mut_ptr().add(k * c * f),
                        f,
                        true,
                        (v.as_ptr().add(k * c), 1, 16 * c),
                        (dm.as_ptr().add(k * f), 16 * f, 1),
                    )
                }
            }
        })
    })
}

/// The weight gradient `[tasks][3·3·c][f]` from the gradient of the transformed weight
/// `[tasks][16][c][f]`: `d g = Gᵀ dU G` for each channel and filter.
pub(crate) fn weight_gradient<T: WithDType>(du: &[T], tasks: usize, c: usize, f: usize) -> Vec<T> {
    let half = T::from_f64(0.5);
    // Gᵀ applied to the four values of one row or column of dU.
    let gt_times = |a: [T; 4]| {
        [
            a[0] + (a[1] + a[2]) * half,
            (a[1] - a[2]) * half,
            (a[1] + a[2]) * half + a[3],
        ]
    };
    separable_transform(du, tasks, c, f, gt_times)
}

/// The output gradient of tile `tile` (counted from image `first`), `[2·2][f]`, zeros where
/// the tile overhangs an odd-sized output.
#[inline(always)]
fn gather_output_gradient<T: WithDType>(
    g: &ConvGeometry,
    f: usize,
    first: usize,
    tile: usize,
    grad: &[T],
    dy: &mut [T],
) {
    let (image, ty, tx) = tile_position(g, first, tile);
    let (oh, ow) = (g.out_height(), g.out_width());
    let origin = ((2 * ty) as isize, (2 * tx) as isize);
    gather_window(grad, (image, oh, ow, f), origin, 2, dy);
}

/// `dM = A dY Aᵀ` for each filter of a `[2·2][f]` output-gradient tile, into `dm` (`[16][f]`):
/// the adjoint of [`transform_output`].
#[inline(always)]
fn transform_output_gradient<T: WithDType>(dy: &[T], dm: &mut [T], f: usize) {
    let (dy, dm) = (&dy[..4 * f], &mut dm[..16 * f]);
    for fo in 0..f {
        let at = |a: usize, b: usize| dy[(a * 2 + b) * f + fo];
        // A along the rows, (d0, d0 + d1, d0 − d1, −d1) for each column b; then along the
        // columns the same way.
        let column = |b: usize| {
            let (d0, d1) = (at(0, b), at(1, b));
            [d0, d0 + d1, d0 - d1, T::zero() - d1]
        };
        let (c0, c1) = (column(0), column(1));
        for i in 0..4 {
            let (r0, r1) = (c0[i], c1[i]);
            let row = [r0, r0 + r1, r0 - r1, T::zero() - r1];
            for (j, value) in row.into_iter().enumerate() {
                dm[(i * 4 + j) * f + fo] = value;
            }
        }
    }
}

/// Tile `tile` (counted from image `first`) of `x`: its 4×4 input window, `[16][c]`, zeros
/// outside the image.
#[inline(always)]
fn gather_patch<T: WithDType>(
    g: &ConvGeometry,
    x: &[T],
    first: usize,
    tile: usize,
    patch: &mut [T],
) {
    let (image, ty, tx) = tile_position(g, first, tile);
    let p = g.padding as isize;
    let origin = ((2 * ty) as isize - p, (2 * tx) as isize - p);
    gather_window(x, (image, g.height, g.width, g.channels), origin, 4, patch);
}

/// The `size × size` window at `origin` (row, column; may lie partly outside) of image `image`
/// of `data` (images of `height × width × channels`, channels last) into `dst`
/// (`[size·size][channels]`), zeros outside the image.
#[inline(always)]
fn gather_window<T: WithDType>(
    data: &[T],
    (image, height, width, channels): (usize, usize, usize, usize),
    (y0, x0): (isize, isize),
    size: usize,
    dst: &mut [T],
) {
    for a in 0..size {
        let iy = y0 + a as isize;
        for b in 0..size {
            let ix = x0 + b as isize;
            let out = &mut dst[(a * size + b) * channels..][..channels];
            if iy >= 0 && iy < height as isize && ix >= 0 && ix < width as isize {
                let at = ((image * height + iy as usize) * width + ix as usize) * channels;
                out.copy_from_slice(&data[at..at + channels]);
            } else {
                out.fill(T::zero());
            }
        }
    }
}

/// `V = Bᵀ d B` for each channel of a `[16][c]` patch, into `v` (`[16][c]`).
#[inline(always)]
fn transform_input<T: WithDType>(d: &[T], v: &mut [T], c: usize) {
    let (d, v) = (&d[..16 * c], &mut v[..16 * c]);
    for ch in 0..c {
        let at = |a: usize, b: usize| d[(a * 4 + b) * c + ch];
        // Bᵀ along the rows: (d0 − d2, d1 + d2, d2 − d1, d1 − d3).
        let mut t = [[T::zero(); 4]; 4];
        for (b, column) in t.iter_mut().enumerate() {
            let (d0, d1, d2, d3) = (at(0, b), at(1, b), at(2, b), at(3, b));
            *column = [d0 - d2, d1 + d2, d2 - d1, d1 - d3];
        }
        // Then along the columns; t is indexed [column][row].
        for i in 0..4 {
            let (t0, t1, t2, t3) = (t[0][i], t[1][i], t[2][i], t[3][i]);
            let row = [t0 - t2, t1 + t2, t2 - t1, t1 - t3];
            for (j, value) in row.into_iter().enumerate() {
                v[(i * 4 + j) * c + ch] = value;
            }
        }
    }
}

/// `Y = Aᵀ M A` for each filter of a `[16][f]` product tile, into `y` (`[2·2][f]`).
#[inline(always)]
fn transform_output<T: WithDType>(m: &[T], y: &mut [T], f: usize) {
    let (m, y) = (&m[..16 * f], &mut y[..4 * f]);
    for fo in 0..f {
        let at = |i: usize, j: usize| m[(i * 4 + j) * f + fo];
        // Aᵀ along the rows: (m0 + m1 + m2, m1 − m2 − m3).
        let (mut s0, mut s1) = ([T::zero(); 4], [T::zero(); 4]);
        for (j, (s0, s1)) in s0.iter_mut().zip(&mut s1).enumerate() {
            let (m0, m1, m2, m3) = (at(0, j), at(1, j), at(2, j), at(3, j));
            *s0 = m0 + m1 + m2;
            *s1 = m1 - m2 - m3;
        }
        let s = [s0, s1];
        for (i, row) in s.iter().enumerate() {
            y[(i * 2) * f + fo] = row[0] + row[1] + row[2];
            y[(i * 2 + 1) * f + fo] = row[1] - row[2] - row[3];
        }
    }
}

/// Writes the 2×2 output tile `y` (`[4][f]`) of tile `tile` into `out`, dropping the half
/// that falls outside an odd-sized output.
#[inline(always)]
fn scatter_tile<T: WithDType>(g: &ConvGeometry, f: usize, tile: usize, y: &[T], out: &mut [T]) {
    let (oh, ow) = (g.out_height(), g.out_width());
    let (image, ty, tx) = tile_position(g, 0, tile);
    for i in 0..2 {
        let oy = 2 * ty + i;
        if oy >= oh {
            break;
        }
        for j in 0..2 {
            let ox = 2 * tx + j;
            if ox >= ow {
                break;
            }
            let at = ((image * oh + oy) * ow + ox) * f;
            out[at..at + f].copy_from_slice(&y[(i * 2 + j) * f..][..f]);
        }
    }
}
