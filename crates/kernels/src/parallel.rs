//! How kernels split work across threads: image chunks that never cross a task boundary, sums
//! over chunks in a fixed order (results independent of the thread count), and output vectors
//! filled piece by piece in parallel.

use candle_core::WithDType;
use rayon::prelude::*;

/// Parallel sums are split into this many fixed groups, each summed in order and then added in
/// group order, so results do not depend on the thread count or on scheduling (rayon's
/// fold/reduce split adaptively, and their float sums changed from run to run).
pub(crate) const REDUCTION_GROUPS: usize = 16;

/// Contiguous image ranges `(task, first image, count)` that never cross a task boundary, each
/// of about `target_rows` rows.
pub(crate) fn chunks(
    images: usize,
    tasks: usize,
    rows_per_image: usize,
    target_rows: usize,
) -> Vec<(usize, usize, usize)> {
    let per_task = images / tasks;
    let per_chunk = (target_rows / rows_per_image.max(1)).clamp(1, per_task.max(1));
    let mut out = Vec::new();
    for task in 0..tasks {
        let mut first = task * per_task;
        let end = first + per_task;
        while first < end {
            let count = per_chunk.min(end - first);
            out.push((task, first, count));
            first += count;
        }
    }
    out
}

/// [`chunks`] for work whose chunks are independent (nothing is summed across them), also small
/// enough that every thread gets several: a small batch (a 5-way 5-shot task's 25 images at a
/// 3×3 layer fit one Winograd chunk) still runs on every core.
pub(crate) fn independent_chunks(
    images: usize,
    tasks: usize,
    rows_per_image: usize,
    target_rows: usize,
) -> Vec<(usize, usize, usize)> {
    let spread = (images * rows_per_image).div_ceil(4 * rayon::current_num_threads());
    chunks(images, tasks, rows_per_image, target_rows.min(spread))
}

/// Per-task sums of `per_task` values over `parts` (ordered by task, as [`chunks`] makes them):
/// `accumulate` adds one part's contribution to its task's slice. Parts are summed in fixed
/// groups, each holding only the tasks it covers, and the groups are added in order, so the
/// result does not depend on the thread count or on scheduling.
pub(crate) fn sum_over_parts<T: WithDType>(
    parts: &[(usize, usize, usize)],
    tasks: usize,
    per_task: usize,
    accumulate: impl Fn(&mut [T], (usize, usize, usize)) + Sync,
) -> Vec<T> {
    let group_len = parts.len().div_ceil(REDUCTION_GROUPS).max(1);
    let groups: Vec<(usize, Vec<T>)> = parts
        .par_chunks(group_len)
        .map(|group| {
            let first_task = group[0].0;
            let covered = group[group.len() - 1].0 + 1 - first_task;
            let mut acc = vec![T::zero(); covered * per_task];
            for &part in group {
                let at = (part.0 - first_task) * per_task;
                accumulate(&mut acc[at..at + per_task], part);
            }
            (first_task, acc)
        })
        .collect();
    let mut sum = vec![T::zero(); tasks * per_task];
    for (first_task, acc) in groups {
        for (total, value) in sum[first_task * per_task..].iter_mut().zip(acc) {
            *total += value;
        }
    }
    sum
}

/// Splits `data` into consecutive pieces of the given lengths.
fn split_lengths<T>(mut data: &mut [T], lengths: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut out = Vec::new();
    for len in lengths {
        let (head, tail) = data.split_at_mut(len);
        out.push(head);
        data = tail;
    }
    out
}

/// A vector made of consecutive pieces of the given lengths, each filled by `fill(piece index,
/// piece)` in parallel. Each piece starts zeroed, by the thread that fills it: zeroing the whole
/// output up front ran on the thread that waits for the parallel work, and was a fifth of the
/// serial time of an adaptation episode (Conv-4, 100 images).
pub(crate) fn filled_in_parallel<T: WithDType>(
    lengths: &[usize],
    fill: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let total = lengths.iter().sum();
    let mut out: Vec<T> = Vec::with_capacity(total);
    let pieces = split_lengths(
        &mut out.spare_capacity_mut()[..total],
        lengths.iter().copied(),
    );
    pieces.into_par_iter().enumerate().for_each(|(i, piece)| {
        for value in piece.iter_mut() {
            value.write(T::zero());
        }
        // Safety: every value of the piece was just written.
        let piece = unsafe { &mut *(piece as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
        fill(i, piece);
    });
    // Safety: the pieces cover the first `total` values, and each was written above.
    unsafe { out.set_len(total) };
    out
}
