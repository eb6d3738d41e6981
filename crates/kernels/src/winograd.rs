//! Winograd's minimal filtering F(4×4, 3×3) for 3×3 stride-1 convolutions on channels-last
//! image rows: 36 multiplications per 4×4 output tile and channel pair instead of 144.
//!
//! The weight `g` of each (channel, filter) pair becomes `U = G g Gᵀ` (6×6), each 6×6 input
//! window `d` of each channel becomes `V = Bᵀ d B`, the 36 positions `(i, j)` of the windows are
//! 36 independent matrix products `M_ij = V_ij · U_ij` over channels, and `Aᵀ M A` turns each
//! 6×6 product tile back into a 4×4 output tile (Lavin and Gray, "Fast Algorithms for
//! Convolutional Neural Networks", 2016, with interpolation points 0, ±1, ±2). In f64 the result
//! equals direct convolution to rounding; in f32 the transforms' larger coefficients (up to 8
//! and 1/24) cost a few more units in the last place than direct convolution.
//!
//! On Conv-4's small images the 4×4 tiles overhang the edges (a 14×14 output takes 16 tiles
//! covering 16×16), and still need 0.73x the products of F(2×2, 3×3) there, 0.56x at 7×7.
//!
//! Used by the fused first-order convolution ([`crate::fused::ConvRows`]) for its
//! forward pass, the input gradient (a 3×3 convolution of the output gradient with the
//! flipped, transposed weight) and the weight gradient (summed in the transformed domain), by
//! the differentiable convolution of second-order MAML, and by the forward-only inference block
//! ([`crate::fused::InferenceBlock`]), which pools each output tile as it is made.

use std::any::Any;
use std::sync::{Arc, Mutex};

use candle_core::{DType, WithDType};

use crate::conv::ConvGeometry;
use crate::gemm::gemm_into;
use crate::pool::pooled_window;
use crate::{vectorized, with_scratch};

/// Side of an output tile.
const TILE: usize = 4;

/// Side of a tile's input window (`TILE + 3 − 1`).
const WINDOW: usize = TILE + 2;

/// Transformed positions per tile: each is one independent product over channels.
pub(crate) const POSITIONS: usize = WINDOW * WINDOW;

/// Fewer input channels than this leave the products too thin to pay for the transforms
/// (a first layer on grey images has one).
const MIN_CHANNELS: usize = 4;

/// Whether a convolution of this shape is one Winograd's F(4×4, 3×3) computes.
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

/// Output tiles per image (4×4 each; the last row or column of tiles may overhang the image).
pub(crate) fn tiles_per_image(g: &ConvGeometry) -> usize {
    g.out_height().div_ceil(TILE) * g.out_width().div_ceil(TILE)
}

/// Tile `tile` counted from image `first`: its image and its tile row and column.
#[inline(always)]
fn tile_position(g: &ConvGeometry, first: usize, tile: usize) -> (usize, usize, usize) {
    let tiles_across = g.out_width().div_ceil(TILE);
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

/// `Uₜ = G g Gᵀ` for every task, channel and filter: `[tasks][3·3·c][f]` → `[tasks][36][c][f]`.
pub(crate) fn transform_weights<T: WithDType>(w: &[T], tasks: usize, c: usize, f: usize) -> Vec<T> {
    let (quarter, half, sixth) = (T::from_f64(0.25), T::from_f64(0.5), T::from_f64(1.0 / 6.0));
    // G applied to the three values (a, b, c) of one kernel column or row: the rows of G are
    // (1/4, 0, 0), −(1, 1, 1)/6, −(1, −1, 1)/6, (1/4, 1/2, 1)/6, (1/4, −1/2, 1)/6, (0, 0, 1).
    let g_times = |[a, b, c]: [T; 3]| {
        let (outer, far) = (a + c, a * quarter + c);
        [
            a * quarter,
            T::zero() - (outer + b) * sixth,
            (b - outer) * sixth,
            (far + b * half) * sixth,
            (far - b * half) * sixth,
            c,
        ]
    };
    separable_transform(w, tasks, c, f, g_times)
}

/// How many transformed weights [`transformed_weights`] keeps.
const REMEMBERED_WEIGHTS: usize = 8;

/// How a weight handed to [`transformed_weights`] is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WeightLayout {
    /// `[tasks][3·3·c][f]`, rows in patch order (kernel row, kernel column, channel).
    PatchOrder,
    /// `[f][c][3][3]`, as a convolution layer holds it (one task).
    Filters,
}

/// A transformed weight and what it was computed from.
struct Remembered {
    dtype: DType,
    layout: WeightLayout,
    channels: usize,
    filters: usize,
    /// The weight's bytes.
    weight: Vec<u8>,
    /// The `Vec<T>` [`transform_weights`] returned.
    transformed: Arc<dyn Any + Send + Sync>,
}

/// The most recently used transformed weights, most recent first.
static REMEMBERED: Mutex<Vec<Remembered>> = Mutex::new(Vec::new());

/// [`transform_weights`] of the weight `w` (laid out as `layout` says), reusing the result of
/// an earlier call with the same bytes for a single task's weight. A deployed model convolves
/// with the same weights call after call (adapting to a task, then classifying its queries), and
/// on the adaptation workload the transforms, which run on one thread before the parallel
/// products, took about 1 ms of a 13 ms episode. Looking up compares whole weights, so a weight
/// changed in place (by an optimiser step) is never mistaken for the one before; a miss costs a
/// copy of the weight. Weights of several tasks (meta-training batches) change every step and
/// are transformed directly.
pub(crate) fn transformed_weights<T: WithDType>(
    w: &[T],
    layout: WeightLayout,
    tasks: usize,
    c: usize,
    f: usize,
) -> Arc<Vec<T>> {
    let transform = || match layout {
        WeightLayout::PatchOrder => transform_weights(w, tasks, c, f),
        WeightLayout::Filters => transform_weights(&in_patch_order(w, c, f), 1, c, f),
    };
    if tasks != 1 {
        return Arc::new(transform());
    }
    // Safety: the weight's values are plain numbers without padding; any bytes are readable.
    let bytes = unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<u8>(), size_of_val(w)) };
    let same = |r: &Remembered| {
        (r.dtype, r.layout, r.channels, r.filters) == (T::DTYPE, layout, c, f) && r.weight == bytes
    };
    {
        let mut remembered = REMEMBERED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = remembered.iter().position(same) {
            let hit = remembered.remove(at);
            let transformed = hit.transformed.clone().downcast::<Vec<T>>();
            remembered.insert(0, hit);
            if let Ok(transformed) = transformed {
                return transformed;
            }
        }
    }
    let transformed = Arc::new(transform());
    let mut remembered = REMEMBERED.lock().unwrap_or_else(|e| e.into_inner());
    remembered.insert(
        0,
        Remembered {
            dtype: T::DTYPE,
            layout,
            channels: c,
            filters: f,
            weight: bytes.to_vec(),
            transformed: transformed.clone(),
        },
    );
    remembered.truncate(REMEMBERED_WEIGHTS);
    transformed
}

/// A `[f][c][3][3]` weight as `[3·3·c][f]` in patch order.
fn in_patch_order<T: WithDType>(w: &[T], c: usize, f: usize) -> Vec<T> {
    let mut out = vec![T::zero(); 9 * c * f];
    for (fo, filter) in w.chunks_exact(9 * c).take(f).enumerate() {
        for (ch, taps) in filter.chunks_exact(9).enumerate() {
            for (tap, &value) in taps.iter().enumerate() {
                out[(tap * c + ch) * f + fo] = value;
            }
        }
    }
    out
}

/// `M X Mᵀ` for every task, channel and filter of `src` (`[tasks][N·N][c][f]`) into
/// `[tasks][K·K][c][f]`, where `m` applies M to one column of N values.
fn separable_transform<T: WithDType, const N: usize, const K: usize>(
    src: &[T],
    tasks: usize,
    c: usize,
    f: usize,
    m: impl Fn([T; N]) -> [T; K],
) -> Vec<T> {
    let lanes = c * f;
    let mut out = vec![T::zero(); tasks * K * K * lanes];
    let mut half_done = vec![T::zero(); N * K * lanes];
    vectorized!(for (src, dst) in src
        .chunks_exact(N * N * lanes)
        .zip(out.chunks_exact_mut(K * K * lanes))
    {
        separable(
            |p| &src[p * lanes..][..lanes],
            dst,
            &mut half_done,
            lanes,
            &m,
        );
    });
    out
}

/// `M X Mᵀ` for each of `lanes` interleaved N×N matrices: `row(i·N + j)` is the `lanes` values
/// of element (i, j), `dst` is `[K·K][lanes]`, `half_done` scratch for `[N·K][lanes]`, and `m`
/// applies M to one column of N values. Every pass runs over the contiguous lanes (channels or
/// filters), so it vectorises.
#[inline(always)]
fn separable<'a, T: WithDType, const N: usize, const K: usize>(
    row: impl Fn(usize) -> &'a [T],
    dst: &mut [T],
    half_done: &mut [T],
    lanes: usize,
    m: &impl Fn([T; N]) -> [T; K],
) {
    // M along the first index, column j of X into half_done[j] (`[K][lanes]`).
    for j in 0..N {
        let ins: [&[T]; N] = gathered(|i| &row(i * N + j)[..lanes]);
        apply_across_lanes(ins, &mut half_done[j * K * lanes..][..K * lanes], m);
    }
    // Then along the second index: row k of the result from element k of each column.
    for k in 0..K {
        let ins: [&[T]; N] = gathered(|j| &half_done[(j * K + k) * lanes..][..lanes]);
        apply_across_lanes(ins, &mut dst[k * K * lanes..][..K * lanes], m);
    }
}

/// `out[k][l] = m(ins[0][l], …, ins[N − 1][l])[k]` for every lane `l`; `out` is `[K][lanes]`.
/// Lanes go in blocks held in local arrays, which the compiler turns into vector operations
/// (over the slices directly it could not rule out aliasing and kept the loop scalar).
#[inline(always)]
fn apply_across_lanes<T: WithDType, const N: usize, const K: usize>(
    ins: [&[T]; N],
    out: &mut [T],
    m: &impl Fn([T; N]) -> [T; K],
) {
    const BLOCK: usize = 8;
    let lanes = out.len() / K;
    let full = lanes - lanes % BLOCK;
    for start in (0..full).step_by(BLOCK) {
        let mut block = [[T::zero(); BLOCK]; N];
        for (block, lane) in block.iter_mut().zip(&ins) {
            block.copy_from_slice(&lane[start..start + BLOCK]);
        }
        let mut result = [[T::zero(); BLOCK]; K];
        for b in 0..BLOCK {
            let values = m(gathered(|i| block[i][b]));
            for (result, value) in result.iter_mut().zip(values) {
                result[b] = value;
            }
        }
        for (k, result) in result.iter().enumerate() {
            out[k * lanes + start..][..BLOCK].copy_from_slice(result);
        }
    }
    for l in full..lanes {
        let values = m(gathered(|i| ins[i][l]));
        for (k, value) in values.into_iter().enumerate() {
            out[k * lanes + l] = value;
        }
    }
}

/// `[value(0), …, value(N − 1)]`, always inlined (`std::array::from_fn` was left out of line in
/// the transforms, and they ran scalar).
#[inline(always)]
fn gathered<T: Copy, const N: usize>(value: impl Fn(usize) -> T) -> [T; N] {
    let mut out = [value(0); N];
    for (i, out) in out.iter_mut().enumerate().skip(1) {
        *out = value(i);
    }
    out
}

/// Convolves images `first..first + count` of `x` (`[images·h·w·c]`, channels last) with one
/// task's transformed weight `u` (`[36][c][f]`, from [`transform_weights`]) into `out`
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
    // Per tile: its transformed positions of c channels, then their products of f filters.
    with_scratch::<T, _>(tiles * POSITIONS * c, tiles * POSITIONS * f, |v, m| {
        vectorized!(convolve_tiles(g, x, u, f, first, v, m, |tile, y| {
            scatter_tile(g, f, tile, y, out)
        }))
    })
}

/// [`convolve_images`] followed by `z = y·a + b` per filter, 2×2 max-pooling and ReLU, applied
/// to each output tile as it is made (the tiles start at even positions, so every pooling
/// window lies inside one), into `out` (`[count·⌊oh/2⌋·⌊ow/2⌋·f]`). The window's outputs are
/// compared as [`crate::fused::BnPoolRelu`] does.
pub(crate) fn convolve_and_pool_images<T: WithDType>(
    g: &ConvGeometry,
    x: &[T],
    u: &[T],
    (a, b): (&[T], &[T]),
    (first, count): (usize, usize),
    out: &mut [T],
) {
    let (c, f) = (g.channels, a.len());
    let tiles = count * tiles_per_image(g);
    with_scratch::<T, _>(tiles * POSITIONS * c, tiles * POSITIONS * f, |v, m| {
        vectorized!(convolve_tiles(g, x, u, f, first, v, m, |tile, y| {
            pool_tile(g, tile, y, (a, b), out)
        }))
    })
}

/// [`convolve_images`] with scratch space for the transformed inputs `v` and the products `m`;
/// `emit(tile, y)` takes each output tile (`[4·4][f]`).
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
    mut emit: impl FnMut(usize, &[T]),
) {
    let c = g.channels;
    let tiles = v.len() / (POSITIONS * c);
    let zeros = vec![T::zero(); c];
    let mut half_done = vec![T::zero(); POSITIONS * c.max(f)];
    for (tile, v_tile) in v.chunks_exact_mut(POSITIONS * c).enumerate() {
        let window = input_window(g, x, first, tile, &zeros);
        separable(window, v_tile, &mut half_done, c, &bt_times);
    }
    for (k, u_k) in u.chunks_exact(c * f).take(POSITIONS).enumerate() {
        // Safety: row `tile` of product k is m[tile·36f + k·f ..][..f], of input k
        // v[tile·36c + k·c ..][..c]; all lie inside the buffers.
        unsafe {
            gemm_into(
                (tiles, f, c),
                m.as_mut_ptr().add(k * f),
                POSITIONS * f,
                false,
                (v.as_ptr().add(k * c), POSITIONS * c, 1),
                (u_k.as_ptr(), f, 1),
            )
        }
    }
    let mut y = vec![T::zero(); TILE * TILE * f];
    for (tile, m_tile) in m.chunks_exact(POSITIONS * f).enumerate() {
        transform_output(m_tile, &mut y, &mut half_done, f);
        emit(tile, &y);
    }
}

/// Adds to `du` (`[36][c][f]`) the gradient of the transformed weight `U` for images
/// `first..first + count` of `x` and their output gradient `grad` (`[images·oh·ow·f]`):
/// Σ over tiles of `V_ij[tile]ᵀ · (A dY Aᵀ)_ij[tile]` for each of the 36 positions `(i, j)`.
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
    with_scratch::<T, _>(tiles * POSITIONS * c, tiles * POSITIONS * f, |v, dm| {
        vectorized!({
            let zeros = vec![T::zero(); c.max(f)];
            let mut half_done = vec![T::zero(); POSITIONS * c.max(f)];
            for (tile, v_tile) in v.chunks_exact_mut(POSITIONS * c).enumerate() {
                let window = input_window(g, x, first, tile, &zeros[..c]);
                separable(window, v_tile, &mut half_done, c, &bt_times);
            }
            for (tile, dm_tile) in dm.chunks_exact_mut(POSITIONS * f).enumerate() {
                // dM = A dY Aᵀ for each filter: the adjoint of the output transform.
                let window = output_gradient_window(g, f, first, tile, grad, &zeros[..f]);
                separable(window, dm_tile, &mut half_done, f, &a_times);
            }
            for k in 0..POSITIONS {
                // Safety: column `tile` of input k is v[tile·36c + k·c ..][..c], row `tile` of
                // gradient k dm[tile·36f + k·f ..][..f]; du holds 36 blocks of c×f.
                unsafe {
                    gemm_into(
                        (c, f, tiles),
                        du.as_mut_ptr().add(k * c * f),
                        f,
                        true,
                        (v.as_ptr().add(k * c), 1, POSITIONS * c),
                        (dm.as_ptr().add(k * f), POSITIONS * f, 1),
                    )
                }
            }
        })
    })
}

/// The weight gradient `[tasks][3·3·c][f]` from the gradient of the transformed weight
/// `[tasks][36][c][f]`: `d g = Gᵀ dU G` for each channel and filter.
pub(crate) fn weight_gradient<T: WithDType>(du: &[T], tasks: usize, c: usize, f: usize) -> Vec<T> {
    let (quarter, half, sixth) = (T::from_f64(0.25), T::from_f64(0.5), T::from_f64(1.0 / 6.0));
    // Gᵀ applied to the six values of one row or column of dU (the columns of G, see
    // `transform_weights`).
    let gt_times = |a: [T; 6]| {
        let (near, far) = (a[1] + a[2], a[3] + a[4]);
        [
            a[0] * quarter + (far * quarter - near) * sixth,
            (a[2] - a[1] + (a[3] - a[4]) * half) * sixth,
            (far - near) * sixth + a[5],
        ]
    };
    separable_transform(du, tasks, c, f, gt_times)
}

/// The output gradient of tile `tile` (counted from image `first`): element `a·4 + b` of its
/// 4×4 window is the `f` values at that pixel, or `zeros` where the tile overhangs the output.
#[inline(always)]
fn output_gradient_window<'a, T: WithDType>(
    g: &ConvGeometry,
    f: usize,
    first: usize,
    tile: usize,
    grad: &'a [T],
    zeros: &'a [T],
) -> impl Fn(usize) -> &'a [T] {
    let (image, ty, tx) = tile_position(g, first, tile);
    let (oh, ow) = (g.out_height(), g.out_width());
    let origin = ((TILE * ty) as isize, (TILE * tx) as isize);
    window(grad, (image, oh, ow, f), origin, TILE, zeros)
}

/// A (6×4) applied to four values: the adjoint of `Aᵀ`, whose rows are (1, 1, 1, 1, 1, 0),
/// (0, 1, −1, 2, −2, 0), (0, 1, 1, 4, 4, 0) and (0, 1, −1, 8, −8, 1).
#[inline(always)]
fn a_times<T: WithDType>([d0, d1, d2, d3]: [T; 4]) -> [T; 6] {
    let (two, four, eight) = (T::from_f64(2.0), T::from_f64(4.0), T::from_f64(8.0));
    let (even, odd) = (d0 + d2, d1 + d3);
    let (even4, odd2) = (d0 + d2 * four, d1 * two + d3 * eight);
    [d0, even + odd, even - odd, even4 + odd2, even4 - odd2, d3]
}

/// Tile `tile` (counted from image `first`) of `x`: element `a·6 + b` of its 6×6 input window
/// is the channels of that pixel, read in place, or `zeros` outside the image (the padding).
#[inline(always)]
fn input_window<'a, T: WithDType>(
    g: &ConvGeometry,
    x: &'a [T],
    first: usize,
    tile: usize,
    zeros: &'a [T],
) -> impl Fn(usize) -> &'a [T] {
    let (image, ty, tx) = tile_position(g, first, tile);
    let p = g.padding as isize;
    let origin = ((TILE * ty) as isize - p, (TILE * tx) as isize - p);
    window(
        x,
        (image, g.height, g.width, g.channels),
        origin,
        WINDOW,
        zeros,
    )
}

/// The `size × size` window at `origin` (row, column; may lie partly outside) of image `image`
/// of `data` (images of `height × width × channels`, channels last): element `a·size + b` is the
/// channels of that pixel, or `zeros` (`channels` long) outside the image. Read in place: the
/// transforms take their inputs from here, with no copy of the window.
#[inline(always)]
fn window<'a, T>(
    data: &'a [T],
    (image, height, width, channels): (usize, usize, usize, usize),
    (y0, x0): (isize, isize),
    size: usize,
    zeros: &'a [T],
) -> impl Fn(usize) -> &'a [T] {
    move |position| {
        let (iy, ix) = (
            y0 + (position / size) as isize,
            x0 + (position % size) as isize,
        );
        if iy >= 0 && iy < height as isize && ix >= 0 && ix < width as isize {
            let at = ((image * height + iy as usize) * width + ix as usize) * channels;
            &data[at..at + channels]
        } else {
            zeros
        }
    }
}

/// Bᵀ applied to six values; its rows are (4, 0, −5, 0, 1, 0), (0, −4, −4, 1, 1, 0),
/// (0, 4, −4, −1, 1, 0), (0, −2, −1, 2, 1, 0), (0, 2, −1, −2, 1, 0) and (0, 4, 0, −5, 0, 1).
#[inline(always)]
fn bt_times<T: WithDType>([d0, d1, d2, d3, d4, d5]: [T; 6]) -> [T; 6] {
    let (two, four, five) = (T::from_f64(2.0), T::from_f64(4.0), T::from_f64(5.0));
    let (sum4, diff4) = ((d1 + d2) * four, (d1 - d2) * four);
    let (sum34, diff43) = (d3 + d4, d4 - d3);
    let (even, odd2) = (d4 - d2, (d3 - d1) * two);
    [
        d0 * four - d2 * five + d4,
        sum34 - sum4,
        diff43 + diff4,
        even + odd2,
        even - odd2,
        d1 * four - d3 * five + d5,
    ]
}

/// Aᵀ applied to six values (its rows are given at [`a_times`]).
#[inline(always)]
fn at_times<T: WithDType>([m0, m1, m2, m3, m4, m5]: [T; 6]) -> [T; 4] {
    let (two, four, eight) = (T::from_f64(2.0), T::from_f64(4.0), T::from_f64(8.0));
    let (sum12, diff12, sum34, diff34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [
        m0 + sum12 + sum34,
        diff12 + diff34 * two,
        sum12 + sum34 * four,
        diff12 + diff34 * eight + m5,
    ]
}

/// `Y = Aᵀ M A` for each filter of a `[36][f]` product tile, into `y` (`[4·4][f]`).
/// `half_done` is scratch for `[6·4][f]`.
#[inline(always)]
fn transform_output<T: WithDType>(m: &[T], y: &mut [T], half_done: &mut [T], f: usize) {
    separable(|p| &m[p * f..][..f], y, half_done, f, &at_times);
}

/// The pooled pixels of output tile `tile` (see [`convolve_and_pool_images`]) into `out`.
#[inline(always)]
fn pool_tile<T: WithDType>(
    g: &ConvGeometry,
    tile: usize,
    y: &[T],
    (a, b): (&[T], &[T]),
    out: &mut [T],
) {
    let f = a.len();
    let (ph, pw) = (g.out_height() / 2, g.out_width() / 2);
    let (image, ty, tx) = tile_position(g, 0, tile);
    for i in 0..TILE / 2 {
        let py = TILE / 2 * ty + i;
        if py >= ph {
            break;
        }
        for j in 0..TILE / 2 {
            let px = TILE / 2 * tx + j;
            if px >= pw {
                break;
            }
            let output = |dy: usize, dx: usize| &y[((2 * i + dy) * TILE + 2 * j + dx) * f..][..f];
            let rows = [output(0, 0), output(0, 1), output(1, 0), output(1, 1)];
            let best = &mut out[((image * ph + py) * pw + px) * f..][..f];
            pooled_window(rows, (a, b), best);
        }
    }
}

/// Writes the 4×4 output tile `y` (`[16][f]`) of tile `tile` into `out`, dropping what falls
/// outside the output.
#[inline(always)]
fn scatter_tile<T: WithDType>(g: &ConvGeometry, f: usize, tile: usize, y: &[T], out: &mut [T]) {
    let (oh, ow) = (g.out_height(), g.out_width());
    let (image, ty, tx) = tile_position(g, 0, tile);
    for i in 0..TILE {
        let oy = TILE * ty + i;
        if oy >= oh {
            break;
        }
        for j in 0..TILE {
            let ox = TILE * tx + j;
            if ox >= ow {
                break;
            }
            let at = ((image * oh + oy) * ow + ox) * f;
            out[at..at + f].copy_from_slice(&y[(i * TILE + j) * f..][..f]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reused transforms are those of the weight's current values: after a change in place, for
    /// another shape read from the same values, and in the other dtype.
    #[test]
    fn remembered_transforms_follow_the_weights() {
        let (c, f) = (3, 5);
        let mut w: Vec<f64> = (0..9 * c * f).map(|i| (i as f64 * 0.37).sin()).collect();
        let first = transformed_weights(&w, WeightLayout::PatchOrder, 1, c, f);
        assert_eq!(*first, transform_weights(&w, 1, c, f));
        let again = transformed_weights(&w, WeightLayout::PatchOrder, 1, c, f);
        assert!(
            Arc::ptr_eq(&first, &again),
            "the same weight is transformed once"
        );
        w[7] += 1e-9;
        let changed = transformed_weights(&w, WeightLayout::PatchOrder, 1, c, f);
        assert_eq!(*changed, transform_weights(&w, 1, c, f));
        assert_ne!(*changed, *first);
        let other_shape = transformed_weights(&w, WeightLayout::PatchOrder, 1, f, c);
        assert_eq!(*other_shape, transform_weights(&w, 1, f, c));
        let w32: Vec<f32> = (0..2 * 9 * c * f).map(|i| i as f32).collect();
        assert_eq!(
            *transformed_weights(&w32, WeightLayout::PatchOrder, 1, c, 2 * f),
            transform_weights(&w32, 1, c, 2 * f)
        );
        assert_eq!(
            *transformed_weights(&w32, WeightLayout::PatchOrder, 2, c, f),
            transform_weights(&w32, 2, c, f)
        );
        // The same bytes read as `[f][c][3][3]` are another weight.
        let as_filters = transformed_weights(&w, WeightLayout::Filters, 1, c, f);
        assert_eq!(
            *as_filters,
            transform_weights(&in_patch_order(&w, c, f), 1, c, f)
        );
        assert_ne!(*as_filters, *changed);
    }

    #[test]
    fn patch_order_puts_kernel_row_then_column_then_channel_first() {
        let (c, f) = (2, 3);
        let w: Vec<f64> = (0..9 * c * f).map(|i| i as f64).collect();
        let p = in_patch_order(&w, c, f);
        for fo in 0..f {
            for ch in 0..c {
                for ky in 0..3 {
                    for kx in 0..3 {
                        let raw = ((fo * c + ch) * 3 + ky) * 3 + kx;
                        assert_eq!(p[((ky * 3 + kx) * c + ch) * f + fo], w[raw]);
                    }
                }
            }
        }
    }
}
